from __future__ import annotations

from django.apps import AppConfig


class MachineMemoryConfig(AppConfig):
    name = "machine_memory"
    verbose_name = "Machine memory"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the system checks (the module's decorators do the work).
        from machine_memory import checks  # noqa: F401
