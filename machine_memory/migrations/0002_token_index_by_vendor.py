from __future__ import annotations

from typing import Any

from django.db import migrations, models


def install_vendor_objects(apps: Any, schema_editor: Any) -> None:
    # Again after the AlterField: the vendor objects at this version (on PostgreSQL the
    # lock + read function, on SQLite the token index, which remaking the table dropped).
    from machine_memory.sql import dialect_for

    dialect_for(schema_editor.connection).install(schema_editor)


class Migration(migrations.Migration):
    """Fencing tokens are indexed only where the next one is derived from the highest
    (SQLite); with sequences the index cost every lock and release an entry for nothing."""

    dependencies = [("machine_memory", "0001_initial")]

    operations = [
        migrations.AlterField(
            model_name="machinelock", name="token", field=models.BigIntegerField()
        ),
        # Backwards, the objects stay: they do no harm to the schema of 0001, and 0001's
        # own reversal drops them all.
        migrations.RunPython(install_vendor_objects, migrations.RunPython.noop, atomic=False),
    ]
