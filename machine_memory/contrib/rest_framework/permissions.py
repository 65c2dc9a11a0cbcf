"""Who may use the REST API: staff users unless ``MACHINE_MEMORY["API_PERMISSION_CLASSES"]``
names other REST framework permission classes (checked at start-up by machine_memory.E015).

The API hands out locks and overwrites any state, so the default is the narrowest useful
one; authentication itself is whatever the project's REST framework settings say.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.utils.module_loading import import_string
from rest_framework.permissions import IsAdminUser

from machine_memory.conf import conf

if TYPE_CHECKING:
    from rest_framework.permissions import _PermissionClass

STAFF_ONLY: list[_PermissionClass] = [IsAdminUser]


def permission_classes() -> list[_PermissionClass]:
    """The configured classes, read on every request so ``override_settings`` applies."""
    paths = conf.API_PERMISSION_CLASSES
    if paths is None:
        return STAFF_ONLY
    return [import_string(path) for path in paths]
