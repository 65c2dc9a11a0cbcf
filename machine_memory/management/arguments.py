"""argparse ``type=`` functions and logging set-up shared by the management commands."""

from __future__ import annotations

import argparse
import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from django.db import connections

from machine_memory.exceptions import InvalidMachineId
from machine_memory.validation import validate_id

if TYPE_CHECKING:
    from collections.abc import Iterator

    from django.core.management.base import OutputWrapper

VERBOSITY_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


# The oldest age an --older-than may name: now minus this must still be a timestamp every
# database stores (PostgreSQL's ends before 294,277 AD and 4,713 BC; MariaDB's DATETIME at
# year 1000), with room to spare.
MAX_AGE = 100 * 365 * 86_400


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    # "nan" and "inf" parse as floats; neither is an age.
    if not 0 <= value <= MAX_AGE:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from 0 to {MAX_AGE} (100 years), got {text}"
        )
    return value


def lock_backend(text: str) -> str:
    """A lock backend as MACHINE_MEMORY["LOCK_BACKEND"] names it, checked by importing it."""
    from machine_memory.locks import ALIASES, backend_class

    try:
        backend_class(text)
    except (ImportError, TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a lock backend ({exc}); choose {', '.join(ALIASES)}, or the "
            "dotted path of a machine_memory.locks.base.LockBackend subclass"
        ) from None
    return text


def machine_id(text: str) -> str:
    try:
        return validate_id(text)
    except InvalidMachineId as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def http_url(text: str) -> str:
    """An http(s) URL with a host, as the bench's --http takes it."""
    parts = urlsplit(text)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http(s) URL such as http://127.0.0.1:8000/api/machine-memory/"
        )
    return text if text.endswith("/") else text + "/"


def database_alias(text: str) -> str:
    if text not in connections:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not in settings.DATABASES (aliases: {', '.join(connections)})"
        )
    return text


def add_database_argument(parser: argparse.ArgumentParser) -> None:
    """``--database ALIAS``, as every command of this app takes it."""
    parser.add_argument(
        "--database",
        type=database_alias,
        default=None,
        help="Database alias. Default: MACHINE_MEMORY['DATABASE'].",
    )


@contextmanager
def logging_for(verbosity: int, stream: OutputWrapper) -> Iterator[None]:
    """Map ``-v`` to the ``machine_memory`` logger's level, printing to ``stream``."""
    logger = logging.getLogger("machine_memory")
    old_level = logger.level
    logger.setLevel(VERBOSITY_LEVELS.get(verbosity, logging.DEBUG))
    handler = None
    if not logger.handlers:
        # Without a handler of its own (settings.LOGGING may give it one), INFO and DEBUG
        # would only reach Python's last-resort handler, which drops them.
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)
    try:
        yield
    finally:
        logger.setLevel(old_level)
        if handler is not None:
            logger.removeHandler(handler)
