from __future__ import annotations

from django.apps import apps
from django.contrib import admin
from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    # The project has no pages of its own: the admin is where the demo's states show up.
    path("", RedirectView.as_view(pattern_name="admin:index")),
    path("admin/", admin.site.urls),
]

# The REST API and its documentation, when their optional packages are installed (settings).
if apps.is_installed("rest_framework"):
    urlpatterns.append(
        path("api/machine-memory/", include("machine_memory.contrib.rest_framework.urls"))
    )
if apps.is_installed("drf_spectacular"):
    from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

    urlpatterns += [
        path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
        path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    ]

# Static files (the admin's, the Swagger UI's) under any server while DEBUG is on; runserver
# serves them anyway. Empty when DEBUG is off.
urlpatterns += staticfiles_urlpatterns()
