"""Settings, system checks and migrations: one test per check id, plus the lazy settings."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, run_checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connections
from django.db.backends.dummy.base import DatabaseWrapper as DummyDatabaseWrapper
from django.test import override_settings

from machine_memory import MachineMemory
from machine_memory.checks import check_settings
from machine_memory.conf import DEFAULTS, conf
from machine_memory.exceptions import MachineMemoryError

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent

VALID = {
    "DATABASE": "default",
    "LOCK_BACKEND": "database",
    "REDIS_CACHE": "default",
    "LOCK_TTL": 120,
    "LOCK_RETRIES": 3,
    "LOCK_BACKOFF": 0.05,
    "READ_RETRIES": 2,
    "READ_BACKOFF": 0.1,
    "MAX_STATE_BYTES": 1_048_576,
    "CLEANUP": "keep",
    "PREPARED_STATEMENTS": None,
    "API_PERMISSION_CLASSES": None,
    "ADMIN_READONLY": True,
}


class NotABackend:
    """Importable, but not a LockBackend subclass (for E004)."""


def messages_for(value: Any) -> list[CheckMessage]:
    with override_settings(MACHINE_MEMORY=value):
        direct = check_settings()
        # The check is registered: the full framework run reports the same messages.
        # databases=[]: since Django 6.0 the model checks otherwise visit every alias, and a
        # MySQL alias connects to its server there (the test settings have dead aliases).
        registered = [
            m for m in run_checks(databases=[]) if (m.id or "").startswith("machine_memory.")
        ]
    assert [m.id for m in registered] == [m.id for m in direct]
    return direct


def assert_reported(messages: list[CheckMessage], check_id: str) -> CheckMessage:
    found = [m for m in messages if m.id == f"machine_memory.{check_id}"]
    assert found, f"machine_memory.{check_id} not in {[m.id for m in messages]}"
    message = found[0]
    assert message.msg
    assert message.hint
    return message


# -- one test per id -----------------------------------------------------------------------


@pytest.mark.parametrize("value", [[], "database", None, ("DATABASE", "default")])
def test_e001_settings_not_a_dict(value: Any) -> None:
    messages = messages_for(value)
    message = assert_reported(messages, "E001")
    assert isinstance(message, Error)
    assert len(messages) == 1


def test_e002_unknown_key() -> None:
    messages = messages_for({"LOCK_TLL": 5, "DATABSE": "default"})
    assert [m.id for m in messages] == ["machine_memory.E002", "machine_memory.E002"]
    message = assert_reported(messages, "E002")
    assert "DATABSE" in message.msg
    assert "LOCK_TTL" in (message.hint or "")


@pytest.mark.parametrize("value", ["nope", "", None, 1, ["default"]])
def test_e003_database_not_an_alias(value: Any) -> None:
    messages = messages_for({"DATABASE": value})
    assert_reported(messages, "E003")
    assert [m.id for m in messages] == ["machine_memory.E003"]


@pytest.mark.parametrize(
    "value",
    [
        "machine_memory.locks.nowhere.Backend",
        "no_such_module.Backend",
        "tests.test_checks.NotABackend",
        "tests.test_checks.VALID",
        "not-a-dotted-path",
    ],
)
def test_e004_lock_backend_unusable(value: str) -> None:
    messages = messages_for({"LOCK_BACKEND": value})
    message = assert_reported(messages, "E004")
    assert value in message.msg


@pytest.mark.parametrize(
    "value",
    [0, -1, 0.0, True, "120", None, datetime.timedelta(0), datetime.timedelta(seconds=-5)],
)
def test_e005_lock_ttl(value: Any) -> None:
    assert_reported(messages_for({"LOCK_TTL": value}), "E005")


@pytest.mark.parametrize("value", [-1, 1.5, "3", True, None])
def test_e006_lock_retries(value: Any) -> None:
    assert_reported(messages_for({"LOCK_RETRIES": value}), "E006")


@pytest.mark.parametrize("value", [-0.01, "0.05", True, None])
def test_e007_lock_backoff(value: Any) -> None:
    assert_reported(messages_for({"LOCK_BACKOFF": value}), "E007")


@pytest.mark.parametrize("value", [-1, 2.0, "2", False])
def test_e008_read_retries(value: Any) -> None:
    assert_reported(messages_for({"READ_RETRIES": value}), "E008")


@pytest.mark.parametrize("value", [-0.1, "0.1", True])
def test_e009_read_backoff(value: Any) -> None:
    assert_reported(messages_for({"READ_BACKOFF": value}), "E009")


@pytest.mark.parametrize("value", [0, -1, 1.5, "1048576", True])
def test_e010_max_state_bytes(value: Any) -> None:
    assert_reported(messages_for({"MAX_STATE_BYTES": value}), "E010")


@pytest.mark.parametrize("value", ["purge", "KEEP", "", None, True])
def test_e011_cleanup(value: Any) -> None:
    assert_reported(messages_for({"CLEANUP": value}), "E011")


@pytest.mark.parametrize("value", ["", None, 1])
def test_e012_redis_cache(value: Any) -> None:
    assert_reported(messages_for({"REDIS_CACHE": value}), "E012")


@pytest.mark.parametrize("value", ["yes", 1, 0])
def test_e014_prepared_statements(value: Any) -> None:
    assert_reported(messages_for({"PREPARED_STATEMENTS": value}), "E014")


@pytest.fixture
def unsupported_alias() -> Iterator[str]:
    """A database alias whose backend is not one machine_memory supports (vendor "unknown")."""
    alias = "unsupported"
    dummy: dict[str, Any] = {"ENGINE": "django.db.backends.dummy"}
    with override_settings(DATABASES={**settings.DATABASES, alias: dummy}):
        # The connection handler read DATABASES once at start-up; give it the wrapper.
        connections[alias] = DummyDatabaseWrapper(dummy, alias)
        try:
            yield alias
        finally:
            del connections[alias]


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES:UserWarning")
def test_e013_unsupported_database_vendor(unsupported_alias: str) -> None:
    assert connections[unsupported_alias].vendor not in ("postgresql", "mysql", "sqlite")
    messages = messages_for({"DATABASE": unsupported_alias})
    message = assert_reported(messages, "E013")
    assert unsupported_alias in message.msg


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES:UserWarning")
@pytest.mark.parametrize("level", ["repeatable read", "SERIALIZABLE"])
def test_w002_mariadb_isolation_level(level: str) -> None:
    mariadb = settings.DATABASES["mariadb"]
    options = {**mariadb.get("OPTIONS", {}), "isolation_level": level}
    with override_settings(
        DATABASES={**settings.DATABASES, "mariadb": {**mariadb, "OPTIONS": options}}
    ):
        message = assert_reported(messages_for({"DATABASE": "mariadb"}), "W002")
    assert isinstance(message, Warning)
    assert "read committed" in (message.hint or "")


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES:UserWarning")
def test_w002_not_reported_for_read_committed() -> None:
    assert messages_for({"DATABASE": "mariadb"}) == []
    mariadb = settings.DATABASES["mariadb"]
    options = {**mariadb.get("OPTIONS", {}), "isolation_level": "read committed"}
    with override_settings(
        DATABASES={**settings.DATABASES, "mariadb": {**mariadb, "OPTIONS": options}}
    ):
        assert messages_for({"DATABASE": "mariadb"}) == []


@pytest.mark.parametrize(
    "value",
    [
        {"LOCK_RETRIES": 5, "LOCK_BACKOFF": 0.1},  # about 3.4 s
        {"LOCK_RETRIES": 10},  # 0.05 s doubling ten times: about 56 s
        {"LOCK_BACKOFF": 0.5},
    ],
)
def test_w001_slow_lock_denial(value: dict[str, Any]) -> None:
    messages = messages_for(value)
    message = assert_reported(messages, "W001")
    assert isinstance(message, Warning)
    assert [m.id for m in messages] == ["machine_memory.W001"]


def test_w001_not_reported_for_the_defaults_or_no_retries() -> None:
    assert messages_for({"LOCK_RETRIES": 3, "LOCK_BACKOFF": 0.05}) == []
    assert messages_for({"LOCK_RETRIES": 0, "LOCK_BACKOFF": 10}) == []


def test_w001_not_reported_when_the_values_are_errors() -> None:
    # A bad value is reported once, by its own id, not again as a window warning.
    messages = messages_for({"LOCK_RETRIES": "many", "LOCK_BACKOFF": 0.5})
    assert [m.id for m in messages] == ["machine_memory.E006"]


# -- valid settings ------------------------------------------------------------------------


def test_every_key_is_covered_by_valid() -> None:
    assert set(VALID) == set(DEFAULTS)


@pytest.mark.parametrize(
    "value",
    [
        VALID,
        {**VALID, "DATABASE": "postgres", "LOCK_TTL": datetime.timedelta(minutes=2)},
        {**VALID, "DATABASE": "mariadb", "LOCK_TTL": 0.5, "CLEANUP": "delete"},
        {**VALID, "LOCK_BACKEND": "machine_memory.locks.database.DatabaseLockBackend"},
        {**VALID, "LOCK_RETRIES": 0, "LOCK_BACKOFF": 0, "READ_RETRIES": 0, "READ_BACKOFF": 0},
        {},
    ],
    ids=["full", "postgres", "mariadb", "dotted-backend", "zeros", "empty"],
)
def test_valid_settings_report_nothing(value: dict[str, Any]) -> None:
    assert messages_for(value) == []


def test_settings_absent_report_nothing() -> None:
    assert not hasattr(settings, "MACHINE_MEMORY")
    assert check_settings() == []


def test_check_command_passes() -> None:
    call_command("check", fail_level="WARNING", verbosity=0, databases=[])


def test_check_command_fails_on_a_bad_setting() -> None:
    from django.core.management.base import SystemCheckError

    with (
        override_settings(MACHINE_MEMORY={"CLEANUP": "purge"}),
        pytest.raises(SystemCheckError, match=r"machine_memory\.E011"),
    ):
        call_command("check", verbosity=0, databases=[])


def test_no_missing_migrations(db_access: None) -> None:
    call_command("makemigrations", "machine_memory", "--check", "--dry-run", verbosity=0)


# -- conf ----------------------------------------------------------------------------------


def test_conf_reads_settings_lazily() -> None:
    assert conf.LOCK_TTL == 120
    with override_settings(MACHINE_MEMORY={"LOCK_TTL": 7}):
        assert conf.LOCK_TTL == 7
        with override_settings(MACHINE_MEMORY={"LOCK_TTL": 9, "CLEANUP": "delete"}):
            assert conf.LOCK_TTL == 9
            assert conf.CLEANUP == "delete"
        assert conf.LOCK_TTL == 7
        assert conf.CLEANUP == "keep"
    assert conf.LOCK_TTL == 120


def test_conf_defaults_for_every_key() -> None:
    with override_settings(MACHINE_MEMORY={}):
        for key, default in DEFAULTS.items():
            assert getattr(conf, key) == default


def test_conf_never_writes_defaults_into_settings() -> None:
    with override_settings(MACHINE_MEMORY={"LOCK_TTL": 5}):
        conf.LOCK_RETRIES  # noqa: B018 - a read must not store the default
        assert getattr(settings, "MACHINE_MEMORY") == {"LOCK_TTL": 5}  # noqa: B009
    assert not hasattr(settings, "MACHINE_MEMORY")


# -- MachineMemory() and the settings ------------------------------------------------------


def test_machine_memory_defaults() -> None:
    memory = MachineMemory()
    assert memory.using == "default"
    assert memory.lock_ttl == 120.0
    assert memory.lock_retries == 3
    assert memory.lock_backoff == 0.05
    assert memory.read_retries == 2
    assert memory.read_backoff == 0.1
    assert memory.max_state_bytes == 1_048_576
    assert memory.cleanup_mode == "keep"


def test_machine_memory_reads_machine_memory_settings() -> None:
    value = {
        "DATABASE": "postgres",
        "LOCK_TTL": datetime.timedelta(seconds=30),
        "LOCK_RETRIES": 1,
        "LOCK_BACKOFF": 0.01,
        "READ_RETRIES": 0,
        "READ_BACKOFF": 0.2,
        "MAX_STATE_BYTES": 1000,
        "CLEANUP": "delete",
    }
    with override_settings(MACHINE_MEMORY=value):
        memory = MachineMemory()
    assert memory.using == "postgres"
    assert memory.locks.database == "postgres"
    assert memory.lock_ttl == 30.0
    assert memory.lock_retries == 1
    assert memory.lock_backoff == 0.01
    assert memory.read_retries == 0
    assert memory.read_backoff == 0.2
    assert memory.max_state_bytes == 1000
    assert memory.cleanup_mode == "delete"


def test_machine_memory_arguments_win_over_settings() -> None:
    with override_settings(MACHINE_MEMORY={"DATABASE": "postgres", "LOCK_TTL": 30}):
        memory = MachineMemory(using="mariadb", lock_ttl=5, lock_retries=0, cleanup="keep")
    assert memory.using == "mariadb"
    assert memory.lock_ttl == 5.0
    assert memory.lock_retries == 0
    assert memory.cleanup_mode == "keep"


def test_machine_memory_owner() -> None:
    assert MachineMemory(owner="worker-1").owner == "worker-1"
    first, second = MachineMemory(), MachineMemory()
    assert first.owner != second.owner
    assert str(os.getpid()) in first.owner


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lock_ttl": 0},
        {"lock_ttl": -1},
        {"lock_ttl": True},
        {"lock_ttl": "120"},
        {"lock_ttl": datetime.timedelta(0)},
        {"owner": ""},
        {"owner": "o" * 256},
        {"owner": 42},
        {"cleanup": "purge"},
        {"lock_retries": -1},
        {"lock_retries": 1.5},
        {"lock_retries": "3"},
        {"lock_backoff": -0.1},
        {"lock_backoff": "0.05"},
        {"read_retries": -1},
        {"read_retries": True},
        {"read_backoff": -1},
        {"max_state_bytes": 0},
        {"max_state_bytes": 10.5},
    ],
    ids=lambda kwargs: repr(kwargs),
)
def test_machine_memory_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as info:
        MachineMemory(**kwargs)
    assert str(info.value)


def test_machine_memory_rejects_an_unknown_alias() -> None:
    with pytest.raises(MachineMemoryError, match="nope"):
        MachineMemory(using="nope")
    # A wrong setting is the configuration's fault: Django's exception for that, with the
    # id of the system check that reports it.
    with (
        override_settings(MACHINE_MEMORY={"DATABASE": "nope"}),
        pytest.raises(ImproperlyConfigured, match=r"DATABASE.*machine_memory\.E003"),
    ):
        MachineMemory()


def test_machine_memory_construction_does_not_connect(db_access: None) -> None:
    # Building the service at import time (module level in a worker) must not open a
    # connection: the server may not be up yet.
    for connection in connections.all():
        connection.close()
    MachineMemory(using="postgres_down")
    assert connections["postgres_down"].connection is None


# -- the package imports without Django settings -------------------------------------------


def test_package_imports_without_settings() -> None:
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
    script = (
        "import sys\n"
        "import machine_memory, machine_memory.exceptions\n"
        "from django.conf import settings\n"
        "assert not settings.configured\n"
        "assert 'machine_memory.models' not in sys.modules\n"
        "assert 'machine_memory.memory' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- one rule per setting: checks, conf and the constructor agree ---------------------------

# For each constructor argument: the setting whose rule validates it, values that rule
# refuses (including ones Python would coerce), and one it accepts.
ARGUMENT_RULES: list[tuple[str, str, list[Any], Any]] = [
    ("lock_ttl", "LOCK_TTL", [0, -1, True, "120", float("nan"), 10**400, 10**7], 30),
    ("lock_retries", "LOCK_RETRIES", [True, -1, 1.5, "3"], 5),
    ("lock_backoff", "LOCK_BACKOFF", ["0.05", -0.1, float("inf"), True, 3600], 0.01),
    ("read_retries", "READ_RETRIES", [True, -1, "2"], 0),
    ("read_backoff", "READ_BACKOFF", ["0.1", float("nan"), False], 0.2),
    ("max_state_bytes", "MAX_STATE_BYTES", [0, True, "10", 1.5], 10),
    ("cleanup", "CLEANUP", ["Delete", 1, ""], "delete"),
]


@pytest.mark.parametrize(("argument", "key", "invalid", "valid"), ARGUMENT_RULES)
def test_checks_conf_and_constructor_agree(
    argument: str, key: str, invalid: list[Any], valid: Any
) -> None:
    from machine_memory.conf import RULES, conf

    check_id = f"machine_memory.{RULES[key].check_id}"
    for value in invalid:
        assert check_id in [m.id for m in messages_for({key: value})], value
        with override_settings(MACHINE_MEMORY={key: value}):
            with pytest.raises(ImproperlyConfigured, match=check_id.replace(".", r"\.")):
                conf.get(key)
            with pytest.raises(ImproperlyConfigured):
                MachineMemory(using="default")
        with pytest.raises(ValueError, match=argument):
            MachineMemory(using="default", **{argument: value})
    assert check_id not in [m.id for m in messages_for({key: valid})]
    with override_settings(MACHINE_MEMORY={key: valid}):
        from_settings = MachineMemory(using="default")
    from_argument = MachineMemory(using="default", **{argument: valid})
    attribute = "cleanup_mode" if argument == "cleanup" else argument
    assert getattr(from_settings, attribute) == getattr(from_argument, attribute)


def test_a_coerced_setting_is_refused_not_used() -> None:
    # Strings and bools that int()/float() would turn into numbers are configuration
    # mistakes: the checks report them, and the memory refuses to run with them.
    settings_value = {"LOCK_RETRIES": True, "LOCK_BACKOFF": "0.05"}
    ids = {m.id for m in messages_for(settings_value)}
    assert {"machine_memory.E006", "machine_memory.E007"} <= ids
    with override_settings(MACHINE_MEMORY=settings_value), pytest.raises(ImproperlyConfigured):
        MachineMemory(using="default")
