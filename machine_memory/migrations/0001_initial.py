from __future__ import annotations

from typing import Any

from django.db import migrations, models

import machine_memory.models


def install_vendor_objects(apps: Any, schema_editor: Any) -> None:
    # The fencing-token sequence (PostgreSQL, MariaDB): see machine_memory/sql/.
    from machine_memory.sql import dialect_for

    dialect_for(schema_editor.connection).install(schema_editor)


def uninstall_vendor_objects(apps: Any, schema_editor: Any) -> None:
    from machine_memory.sql import dialect_for

    dialect_for(schema_editor.connection).uninstall(schema_editor)


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="MachineLock",
            fields=[
                (
                    "machine_id",
                    machine_memory.models.MachineIdField(
                        max_length=512, primary_key=True, serialize=False
                    ),
                ),
                ("owner", models.CharField(max_length=255)),
                ("token", models.BigIntegerField(db_index=True)),
                ("acquired_at", models.DateTimeField()),
                ("expires_at", models.DateTimeField(db_index=True)),
            ],
            options={
                "verbose_name": "machine lock",
                "db_table": "machine_memory_lock",
            },
        ),
        migrations.CreateModel(
            name="MachineState",
            fields=[
                (
                    "machine_id",
                    machine_memory.models.MachineIdField(
                        max_length=512, primary_key=True, serialize=False
                    ),
                ),
                ("state", machine_memory.models.StateField()),
                ("version", models.BigIntegerField(default=1)),
                ("fence", models.BigIntegerField(default=0)),
                (
                    "execution_status",
                    models.CharField(blank=True, db_index=True, max_length=64, null=True),
                ),
                (
                    "parent_id",
                    machine_memory.models.MachineIdField(
                        blank=True, db_index=True, max_length=512, null=True
                    ),
                ),
                ("initiator", models.CharField(blank=True, max_length=255, null=True)),
                ("source", models.CharField(blank=True, db_index=True, max_length=255, null=True)),
                ("created_at", models.DateTimeField()),
                ("updated_at", models.DateTimeField()),
            ],
            options={
                "verbose_name": "machine state",
                "db_table": "machine_memory_state",
            },
        ),
        migrations.RunPython(install_vendor_objects, uninstall_vendor_objects, atomic=False),
    ]
