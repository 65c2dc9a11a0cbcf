"""Mutation testing of the contract code (docs/development.md#mutation-testing); not part of CI.

mutmut ([tool.mutmut] in pyproject.toml) writes the mutants to mutants/ and keeps their
results there, for ``mutmut results``, ``mutmut show NAME`` and ``mutmut browse``. This
script runs them in one pytest session: the test databases are made once, and each mutant
runs in a fork of that session, only the tests that reach its function (fastest first,
until one fails). ``mutmut run`` starts a pytest session per mutant, which makes the test
databases again for each one (seconds per mutant; hours for this code).
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import gc
import json
import os
import re
import select
import shutil
import signal
import sys
import time
import traceback
from collections import Counter, defaultdict
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterable

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
SURVIVORS = ROOT / "docs" / "mutation-survivors.md"
# The mutants last judged on part of their tests (--budget): a survivor there may yet die.
PARTIAL = MUTANTS / "mutation-partial.json"
# For each function, the tests that killed its mutants and how many: tried first on the next
# mutant of that function (mutants of one function mostly fall to the same few tests).
KILLERS = MUTANTS / "mutation-killers.json"
VIEWS = "machine_memory.contrib.rest_framework.views."
# Of the API, only the precondition handling (If-Match, If-None-Match, Lock-Token) is
# contract code; the other functions of views.py are generated but skipped.
API_PRECONDITIONS = {
    VIEWS + name
    for name in (
        "xǁEntityTagsǁ__init__",
        "xǁEntityTagsǁmatches_weakly",
        "xǁEntityTagsǁversions",
        "x__precondition",
        "x__lock_token",
        "x__memory",
        "x__matching_version",
        "x__stale",
        "x__headers",
        "x_owner_for",
        "xǁStateDetailViewǁget",
        "xǁStateDetailViewǁput",
        "xǁStateDetailViewǁ_create",
        "xǁStateDetailViewǁ_overwrite",
        "xǁStateDetailViewǁ_compare_and_set",
        "xǁStateDetailViewǁdelete",
        "xǁLockDetailViewǁpatch",
        "xǁLockDetailViewǁdelete",
    )
}
# mutmut's exit codes (mutmut.stats.status_by_exit_code).
KILLED, SURVIVED, NO_TESTS, SKIPPED, SUSPICIOUS, TIMEOUT = 1, 0, 33, 34, 35, 36
# A test of a mutant may take this many times its clean duration, at least MIN_TEST_TIME s.
TIME_FACTOR = 5
MIN_TEST_TIME = 5.0
# A test this fast (seconds) runs in the first round with every one of its variants.
CHEAP_TEST = 0.005
MUTANT_NAME = re.compile(r"`(machine_memory\.[^`\s]+__mutmut_\d+)`")


def function_of(mutant: str) -> str:
    return mutant.partition("__mutmut_")[0]


def equivalents() -> dict[str, str]:
    """The survivors docs/mutation-survivors.md lists as equivalent, with the reason."""
    found = {}
    if SURVIVORS.exists():
        for line in SURVIVORS.read_text().splitlines():
            names = MUTANT_NAME.findall(line)
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            for name in names:
                found[name] = cells[-1] if len(cells) > 1 else ""
    return found


# -- generating the mutants (mutmut) -------------------------------------------------------------


def generate() -> list[Path]:
    """Write the mutants of the changed source files to mutants/; the mutated files."""
    from mutmut.__main__ import (
        copy_also_copy_files,
        copy_src_dir,
        create_mutants,
        setup_source_paths,
    )
    from mutmut.utils.file_utils import walk_mutatable_files

    MUTANTS.mkdir(exist_ok=True)
    # Nothing in mutants/ is the project's: git, ruff and mypy leave it alone.
    (MUTANTS / ".gitignore").write_text("*\n")
    # The tests as they are now, without those removed since the last run.
    shutil.rmtree(MUTANTS / "tests", ignore_errors=True)
    copy_src_dir()
    copy_also_copy_files()
    setup_source_paths()
    stats = create_mutants(max_children=2)
    print(f"mutmut: {stats.mutated} files mutated again, {stats.unmodified} unchanged")
    return list(walk_mutatable_files())


# -- running them in one pytest session ----------------------------------------------------------


class _SessionLevel:
    """A stand-in next item whose chain is the session alone: a test's teardown then ends
    its own fixtures, module and class, but keeps the session's (the test databases)."""

    def __init__(self, session: pytest.Session) -> None:
        self.session = session

    def listchain(self) -> list[Any]:
        return [self.session]


class MutationRunner:
    """A pytest plugin: runs the selected tests once recording which functions each one
    reaches (mutmut's "stats" trampolines), then each mutant in a fork."""

    def __init__(
        self,
        files: list[Path],
        patterns: list[str],
        *,
        resume: bool,
        survivors: bool,
        budget: float,
    ) -> None:
        self.files = files
        self.patterns = patterns
        self.resume = resume
        self.survivors = survivors
        self.budget = budget
        self.equivalents = equivalents()
        self.killers: dict[str, Counter[str]] = defaultdict(Counter)
        if KILLERS.exists():
            for function, counts in json.loads(KILLERS.read_text()).items():
                self.killers[function].update(counts)
        self.partial: set[str] = set()
        self.passed: set[str] = set()
        self.failed: set[str] = set()
        self.duration: dict[str, float] = defaultdict(float)
        self.tests_of: dict[str, set[str]] = defaultdict(set)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.duration[report.nodeid] += report.duration
        if report.failed:
            self.failed.add(report.nodeid)
        elif report.when == "call" and report.passed:
            self.passed.add(report.nodeid)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        from mutmut.mutation.trampoline import set_mutant_under_test
        from mutmut.state import state

        import machine_memory

        assert Path(machine_memory.__file__).is_relative_to(MUTANTS), machine_memory.__file__
        if session.config.option.collectonly:
            return True
        items = session.items
        level = _SessionLevel(session)
        start = time.monotonic()
        set_mutant_under_test("stats")
        for i, item in enumerate(items):
            nextitem = items[i + 1] if i + 1 < len(items) else level
            item.ihook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            for function in state()._stats:
                self.tests_of[function].add(item.nodeid)
            state()._stats.clear()
        set_mutant_under_test("")
        usable = self.passed - self.failed
        print(
            f"\nclean run: {len(usable)} tests pass, {len(self.failed)} fail and are left out,"
            f" {len(items) - len(usable) - len(self.failed)} skipped,"
            f" {time.monotonic() - start:.0f} s"
        )
        for nodeid in sorted(self.failed):
            print(f"  left out (fails without a mutant): {nodeid}")
        by_id = {item.nodeid: item for item in items if item.nodeid in usable}
        try:
            self.run_mutants(by_id, level)
        finally:
            # The session's fixtures end here, before tests/conftest.py's sessionfinish
            # removes the SQLite files (a normal run ends them with its last test).
            session._setupstate.teardown_exact(None)
        return True

    def selected(self) -> list[tuple[Any, str]]:
        """(file's mutmut data, mutant) for every mutant to run; the others are marked."""
        from django.conf import settings
        from mutmut.mutation.data import SourceFileMutationData

        chosen = []
        for path in sorted(self.files, key=_group_index):
            if path.name == "mysql.py" and "mariadb" not in settings.REAL_DATABASES:
                # Only MariaDB runs this module: its mutants keep the results they have.
                print(f"{path}: not run (MariaDB is not among MM_TEST_DATABASES)")
                continue
            data = SourceFileMutationData(path=path)
            data.meta_path = MUTANTS / f"{path}.meta"
            data.load()
            for name, code in data.exit_code_by_key.items():
                if name.startswith(VIEWS) and function_of(name) not in API_PRECONDITIONS:
                    data.exit_code_by_key[name] = SKIPPED
                elif self.wanted(path, name, code):
                    chosen.append((data, name))
            data.save()
        return chosen

    def wanted(self, path: Path, name: str, code: int | None) -> bool:
        if self.patterns and not any(fnmatch.fnmatch(name, p) for p in self.patterns):
            return False
        if self.survivors:
            # Not those known to change nothing: no test can kill them.
            return code in (SURVIVED, NO_TESTS, None) and not (
                name in self.equivalents or equivalent_by_construction(path, name)
            )
        return not (self.resume and code is not None)

    def run_mutants(self, by_id: dict[str, pytest.Item], level: _SessionLevel) -> None:
        from django.db import connections

        chosen = self.selected()
        partial = _partial()
        print(f"{len(chosen)} mutants to run")
        start = time.monotonic()
        counts: Counter[int] = Counter()
        gc.collect()
        gc.freeze()  # the forks then share the session's memory instead of copying it
        for n, (data, name) in enumerate(chosen, 1):
            function = function_of(name)
            tests = self.order(function, (t for t in self.tests_reaching(function) if t in by_id))
            began = time.monotonic()
            if not tests:
                code = NO_TESTS
            else:
                for connection in connections.all():
                    connection.close()  # no socket shared with a fork
                code, killer = self.run_one(name, [by_id[t] for t in tests], level)
                if killer is not None:
                    self.killers[function][killer] += 1
                    KILLERS.write_text(json.dumps(self.killers, ensure_ascii=False, indent=0))
                if code == TIMEOUT:
                    self.expire_live_locks()
            counts[code] += 1
            if name not in self.partial:
                partial.discard(name)
            partial |= self.partial
            PARTIAL.write_text(json.dumps(sorted(partial), ensure_ascii=False, indent=0))
            data.exit_code_by_key[name] = code
            data.durations_by_key[name] = time.monotonic() - began
            data.save()
            if n % 25 == 0 or n == len(chosen):
                print(
                    f"{n}/{len(chosen)} mutants, {time.monotonic() - start:.0f} s:"
                    f" {counts[KILLED]} killed, {counts[TIMEOUT]} timeout,"
                    f" {counts[SURVIVED]} survived, {counts[NO_TESTS]} no tests,"
                    f" {counts[SUSPICIOUS]} suspicious",
                    flush=True,
                )
        gc.unfreeze()

    def tests_reaching(self, function: str) -> set[str]:
        """The tests that ran ``function`` in the clean run. A constructor gets those of
        every method of its class too: an object made once (a dialect, by the first test that
        needs one) is used by tests that never see it made."""
        tests = set(self.tests_of.get(function, ()))
        if function.endswith("ǁ__init__"):
            cls = function.removesuffix("__init__")
            for other, reached in self.tests_of.items():
                if other.startswith(cls):
                    tests |= reached
        return tests

    def order(self, function: str, tests: Iterable[str]) -> list[str]:
        """Cheapest first, where the tests that killed mutants of ``function`` before cost
        their duration divided by one more than their kills: they have shown they test
        this function, yet a slow one must not spend the budget that many fast ones could
        use (a constructor's mutants reach nearly every test). One variant of each other
        test before the second of any: the variants of a parametrised test (one per
        database, per lock backend) seldom disagree; but every variant of a test faster
        than CHEAP_TEST in the first round."""
        killers = self.killers.get(function, Counter())

        def cost(test: str) -> float:
            return self.duration[test] / (1 + killers[test])

        tests = set(tests)
        # Killers of this function, and cheap variants (unit tests, each pinning another input
        # or message: they cost next to nothing, and they do disagree), all in the first round.
        first_round = {t for t in tests if killers[t]}
        first_round |= {t for t in tests if self.duration[t] < CHEAP_TEST}
        variants: dict[str, list[str]] = defaultdict(list)
        for test in sorted(tests - first_round, key=lambda t: self.duration[t]):
            variants[test.partition("[")[0]].append(test)
        rounds: dict[int, list[str]] = defaultdict(list)
        for same in variants.values():
            for n, test in enumerate(same):
                rounds[n].append(test)
        first = sorted([*first_round, *rounds.pop(0, [])], key=lambda t: (cost(t), t))
        return first + [test for n in sorted(rounds) for test in rounds[n]]

    def run_one(
        self, name: str, tests: list[pytest.Item], level: _SessionLevel
    ) -> tuple[int, str | None]:
        """The mutant's exit code, and the test that killed it (None: none did, or a
        timeout)."""
        if self.budget:
            # Within the budget (the clean durations); at least one test.
            spent = 0.0
            for n, test in enumerate(tests):
                spent += self.duration[test.nodeid]
                if n and spent > self.budget:
                    self.partial.add(name)
                    tests = tests[:n]
                    break
        limits = [max(MIN_TEST_TIME, TIME_FACTOR * self.duration[t.nodeid]) for t in tests]
        sys.stdout.flush()
        sys.stderr.flush()
        # The fork writes the node id of the test that failed here.
        report_read, report_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(report_read)
            os._exit(_child(name, tests, limits, level, report_write))
        os.close(report_write)
        # The fork ends a test that runs over its limit itself; this is for a fork stuck
        # where no signal handler runs.
        deadline = time.monotonic() + sum(limits) + 10
        fd = os.pidfd_open(pid)
        try:
            while not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                if time.monotonic() >= deadline:
                    os.kill(pid, signal.SIGKILL)
                    break
        finally:
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(report_read, "rb") as report:
            killer = report.read().decode() or None
        code = os.waitstatus_to_exitcode(status)
        return (TIMEOUT, None) if code < 0 else (code, killer if code == KILLED else None)

    @staticmethod
    def expire_live_locks() -> None:
        """After a fork was ended mid-test: expire the locks it left, which would otherwise
        fail the next tests' check that none is left (tests/conftest.py)."""
        from django.conf import settings
        from django.db import DatabaseError, connections
        from django_redis import get_redis_connection
        from pytest_django.plugin import blocking_manager_key
        from redis.exceptions import RedisError

        from machine_memory.models import MachineLock, StorageNow

        with _CONFIG[0].stash[blocking_manager_key].unblock():
            for alias in settings.REAL_DATABASES:
                try:
                    MachineLock.objects.using(alias).live().update(expires_at=StorageNow())
                except DatabaseError:
                    pass
                finally:
                    connections[alias].close()
        try:
            client = get_redis_connection("redis", write=True)
            keys = list(client.scan_iter(match=b"*machine_memory:lock:*", count=1000))
            if keys:
                client.delete(*keys)
        except RedisError:
            pass


_CONFIG: list[pytest.Config] = []


def _child(
    name: str, tests: list[pytest.Item], limits: list[float], level: _SessionLevel, report: int
) -> int:
    """In the fork: the tests against mutant ``name`` until one fails. An exit code; the
    failed test's node id is written to the file descriptor ``report``."""
    from _pytest.runner import runtestprotocol
    from mutmut.mutation.trampoline import set_mutant_under_test

    try:
        set_mutant_under_test(name)
        _fresh_executors()
        _fresh_caches()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        signal.signal(signal.SIGALRM, lambda signum, frame: os._exit(TIMEOUT))
        for i, (item, limit) in enumerate(zip(tests, limits, strict=True)):
            signal.setitimer(signal.ITIMER_REAL, limit)
            reports = runtestprotocol(
                item, log=False, nextitem=tests[i + 1] if i + 1 < len(tests) else level
            )
            signal.setitimer(signal.ITIMER_REAL, 0)
            if any(r.failed for r in reports):
                os.write(report, item.nodeid.encode())
                return KILLED
        return SURVIVED
    except BaseException:
        # Not a test that failed (pytest reports those): the run itself broke.
        with open(MUTANTS / "mutation-errors.log", "a") as log:
            log.write(f"{name}\n{traceback.format_exc()}\n")
        return SUSPICIOUS


def _fresh_caches() -> None:
    # What the clean run built and kept would hide a mutant in the code that builds it: the
    # dialects cache each statement's SQL the first time it is asked for (Dialect.statement).
    import machine_memory.sql

    machine_memory.sql._dialects.clear()


def _fresh_executors() -> None:
    # The fork has none of the session's threads: asgiref's executor for sync_to_async
    # would wait forever for a thread that is not there.
    from concurrent.futures import ThreadPoolExecutor

    from asgiref.sync import SyncToAsync

    SyncToAsync.single_thread_executor = ThreadPoolExecutor(max_workers=1)


def _partial() -> set[str]:
    return set(json.loads(PARTIAL.read_text())) if PARTIAL.exists() else set()


class _ConfigKeeper:
    def pytest_configure(self, config: pytest.Config) -> None:
        _CONFIG.append(config)


# -- message-only mutants -------------------------------------------------------------------


def _is_message(node: ast.AST | None) -> bool:
    """Text meant for people: an f-string, a concatenation, a constant with a space (not
    a constant such as an API error code, which clients compare)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and " " in node.value.strip("X")
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _is_message(node.left) or _is_message(node.right)
    return isinstance(node, ast.JoinedStr)


def _first_difference(a: Any, b: Any, path: list[ast.AST]) -> tuple[list[ast.AST], Any, Any] | None:
    if type(a) is not type(b) or not isinstance(a, ast.AST):
        return None if a == b else (path, a, b)
    for field in a._fields:
        x, y = getattr(a, field, None), getattr(b, field, None)
        if isinstance(x, list) and isinstance(y, list) and len(x) != len(y):
            return ([*path, a], x, y)
        pairs = zip(x, y, strict=True) if isinstance(x, list) and isinstance(y, list) else [(x, y)]
        for p, q in pairs:
            found = _first_difference(p, q, [*path, a])
            if found is not None:
                return found
    return None


@cache
def _mutated_functions(path: Path) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse((MUTANTS / path).read_text())
    return {
        node.name: node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and "__mutmut_" in node.name
    }


def _difference(path: Path, mutant: str) -> tuple[list[ast.AST], Any, Any] | None:
    """Where the mutant's function first differs from the original: the nodes down to it,
    and what was there before and after."""
    functions = _mutated_functions(path)
    name = mutant.rpartition(".")[2]
    orig = functions.get(function_of(name) + "__mutmut_orig")
    if orig is None or name not in functions:
        return None
    return _first_difference(ast.Module(orig.body), ast.Module(functions[name].body), [])


def message_only(path: Path, mutant: str) -> bool:
    """Whether the mutant changes only the text of an exception or a log record."""
    found = _difference(path, mutant)
    if found is None:
        return False
    path_to, before, after = found
    if isinstance(before, str):  # a constant's text changed
        before, after = path_to.pop(), ast.Constant(after)
    elif isinstance(before, list):  # an argument removed
        before = [node for node in before if ast.dump(node) not in map(ast.dump, after)]
        if len(before) != 1:
            return False
        before, after = before[0], None
    if after is not None and not isinstance(after, ast.Constant):
        return False
    # An argument of a log call (its text or what fills it in) is the record's text.
    logged = [node for node in path_to if _is_log_call(node)]
    if logged and any(sub is before for arg in logged[-1].args for sub in ast.walk(arg)):
        return True
    if not _is_message(before):
        return False
    return any(
        isinstance(node, ast.Raise) or _is_log_call(node) or _is_exception_call(node)
        for node in path_to
    )


def _is_log_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in ("logger", "warnings")
    )


def _is_exception_call(node: ast.AST) -> bool:
    """An exception made to be returned or raised elsewhere: ``WriteError(...)``."""
    if not isinstance(node, ast.Call):
        return False
    name = node.func.id if isinstance(node.func, ast.Name) else ""
    return name.endswith(("Error", "Conflict", "Lost", "Unknown", "NotAcquired"))


# -- survivors equivalent by construction ------------------------------------------------------

# Words whose case SQL ignores on every supported database: keywords, function names and
# the app's column names. Not table names or aliases, which MariaDB compares
# case-sensitively on Linux.
SQL_KEYWORDS = frozenset(
    """select from where and or not in exists insert into values on conflict do update set
    delete returning as is null limit for with order by asc desc count coalesce max
    nothing ignore dual interval microsecond begin end declare default if then else
    elseif return query call procedure function create replace sequence index drop table
    language returns plpgsql volatile found start transaction commit rollback left join
    union all handler exit sqlexception resignal bigint int boolean varchar longtext
    character collate utf8mb4 double precision jsonb timestamptz true false row_count
    last_insert_id nextval utc_timestamp statement_timestamp make_interval secs strftime
    now excluded kill information_schema processlist id machine_id owner token acquired_at
    expires_at state version fence
    execution_status parent_id initiator source created_at updated_at""".split()  # noqa: SIM905
)


def _changed_words(before: str, after: str) -> set[str] | None:
    """The words whose case alone differs between two texts; None if more than case differs."""
    if before.lower() != after.lower():
        return None
    split = re.compile(r"[A-Za-z0-9_]+")
    return {
        a.lower()
        for a, b in zip(split.findall(before), split.findall(after), strict=True)
        if a != b
    }


# The vendor modules whose SQL ignores the case of every name as well as of keywords (not
# base.py's or mysql.py's: MariaDB compares table names and aliases case-sensitively).
CASE_BLIND_SQL = {
    "postgresql.py": "SQL in another case: PostgreSQL folds unquoted names to lower case",
    "sqlite.py": "SQL in another case: SQLite compares names and keywords without case",
}


# Names MariaDB compares without case besides keywords: the parameters of the stored
# procedures (p_id, p_owner, ...) and collation and character set names.
MARIADB_CASE_BLIND = re.compile(r"p_[a-z_]+|utf8mb4(_[a-z0-9]+)*")


# The header names the API reads and sets: HTTP names, which Django's request.headers and
# HttpResponse look up without case.
HTTP_HEADERS = frozenset({"etag", "if-match", "if-none-match", "lock-token", "retry-after"})


def _is_cast_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "cast"
        and bool(node.args)
    )


def _case_only_outside_literals(before: str, after: str) -> bool:
    """Whether two texts differ only in the case of letters that are neither inside a
    single-quoted literal (counted from the text's start) nor a %-placeholder's letter."""
    if before == after or before.lower() != after.lower():
        return False
    quoted = False
    for n, (a, b) in enumerate(zip(before, after, strict=True)):
        if a == "'":
            quoted = not quoted
        if a != b and (quoted or (n and before[n - 1] == "%")):
            return False
    return True


def _is_statement_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "statement"
        and bool(node.args)
    )


def equivalent_by_construction(path: Path, mutant: str) -> str | None:
    """Why a survivor changes no behaviour, when its change alone shows it; else None.

    - The case of SQL keywords only: every supported database ignores it.
    - The text of a statement-cache key (``Dialect.statement``) only: the key is a label;
      a key that stays a unique string builds and caches the very same SQL. A key that is
      a plain string names one SQL text, so even None in its place caches the same; a key
      with variants (a tuple) turned into None is not counted, as they would share it.
    """
    found = _difference(path, mutant)
    if found is None:
        return None
    path_to, before, after = found
    if len(path_to) >= 2 and _is_cast_call(path_to[-2]):
        changed = path_to[-1] if isinstance(before, str) else before
        if changed is cast("ast.Call", path_to[-2]).args[0]:
            return "the type named to typing.cast, which does nothing at run time"
    if (
        isinstance(before, str)
        and after is None
        and len(path_to) >= 2
        and _is_statement_call(path_to[-2])
        and cast("ast.Call", path_to[-2]).args[0] is path_to[-1]
    ):
        return "a statement-cache key's text"
    if not (isinstance(before, str) and isinstance(after, str)):
        return None
    words = _changed_words(before, after)
    if words and words <= SQL_KEYWORDS:
        return "SQL keywords in another case"
    if (
        path.name == "mysql.py"
        and words
        and all(w in SQL_KEYWORDS or MARIADB_CASE_BLIND.fullmatch(w) for w in words)
    ):
        return "MariaDB routine parameters or collation names in another case"
    if path.name in CASE_BLIND_SQL and _case_only_outside_literals(before, after):
        return CASE_BLIND_SQL[path.name]
    header = after.lower()
    if path.name == "views.py" and before.lower() == header and header in HTTP_HEADERS:
        return "an HTTP header name in another case: Django compares them without case"
    # The changed text is the key, or a part of the key's tuple.
    for index, node in enumerate(path_to[:-1]):
        if _is_statement_call(node) and path_to[index + 1] is cast("ast.Call", node).args[0]:
            return "a statement-cache key's text"
    return None


# -- the summary ---------------------------------------------------------------------------------

GROUPS = [
    ("memory core", ("memory.py", "validation.py", "versions.py", "retry.py")),
    ("vendor SQL", ("sql/",)),
    ("lock backends", ("locks/",)),
    ("QuerySets", ("models.py",)),
    ("API preconditions", ("contrib/rest_framework/views.py",)),
]
STATUS = {
    KILLED: "killed",
    3: "killed",
    TIMEOUT: "timeout",
    SURVIVED: "survived",
    NO_TESTS: "no tests",
    SUSPICIOUS: "suspicious",
    SKIPPED: "skipped",
    None: "not run",
}


def _group_index(path: Path) -> int:
    module = str(path).removeprefix("machine_memory/")
    return next((n for n, (_, p) in enumerate(GROUPS) if module.startswith(p)), len(GROUPS))


def summary(files: Iterable[Path]) -> int:
    """Print killed / timeout / survived / equivalent per module; the untriaged survivors."""
    from mutmut.mutation.data import SourceFileMutationData

    listed = equivalents()
    partial = _partial()
    rows: list[tuple[str, Counter[str]]] = []
    survivors: list[str] = []
    messages: list[str] = []
    untested: list[str] = []
    stale: list[str] = []
    seen: set[str] = set()
    for path in files:
        data = SourceFileMutationData(path=path)
        data.meta_path = MUTANTS / f"{path}.meta"
        data.load()
        count: Counter[str] = Counter()
        for name, code in data.exit_code_by_key.items():
            seen.add(name)
            status = STATUS.get(code, "suspicious")
            if status == "skipped":
                continue
            if (status == "survived" and name in listed) or (
                status == "survived" and equivalent_by_construction(path, name)
            ):
                status = "equivalent"
            elif status == "survived" and message_only(path, name):
                status = "message"
                messages.append(name)
            elif status == "survived":
                survivors.append(name)
            elif status == "no tests" and name not in listed:
                untested.append(name)
            elif name in listed:
                stale.append(f"{name} ({status})")
            count[status] += 1
        if count:
            rows.append((str(path).removeprefix("machine_memory/"), count))
    stale += [f"{name} (no such mutant)" for name in listed if name not in seen]
    columns = [
        "killed",
        "timeout",
        "survived",
        "message",
        "equivalent",
        "no tests",
        "suspicious",
        "not run",
    ]
    print(f"\n{'module':34} {'mutants':>7} " + " ".join(f"{c:>10}" for c in columns) + "  score")
    total: Counter[str] = Counter()
    for group, prefixes in GROUPS:
        subtotal: Counter[str] = Counter()
        for module, count in rows:
            if module.startswith(prefixes):
                _row(module, count, columns)
                subtotal += count
        _row(f"  = {group}", subtotal, columns)
        total += subtotal
    _row("all", total, columns)
    print(
        "score: (killed + timeout) / (mutants - equivalent - not run); equivalent survivors are"
        f" listed in {SURVIVORS.relative_to(ROOT)}; message: survivors that change only the"
        " text of an exception or a log record"
    )
    if stale:
        print(f"\nListed as equivalent but not a survivor now ({len(stale)}):")
        print("\n".join(f"  {name}" for name in stale))
    if messages:
        print(f"\nSurvivors that change only a message ({len(messages)}):")
        print("\n".join(f"  {name}" for name in messages))
    if survivors:
        print(f"\nSurvivors not triaged ({len(survivors)}; `mutmut show NAME` shows one):")
        print(
            "\n".join(
                f"  {name}" + (" (on part of its tests)" if name in partial else "")
                for name in survivors
            )
        )
    if untested:
        print(f"\nMutants that no test reaches ({len(untested)}):")
        print("\n".join(f"  {name}" for name in untested))
    return 1 if survivors or messages or untested else 0


def _row(module: str, count: Counter[str], columns: list[str]) -> None:
    mutants = sum(count.values())
    scored = mutants - count["equivalent"] - count["not run"]
    # Nothing judged yet: no score, rather than a 100 % nobody earned.
    score = f"{(count['killed'] + count['timeout']) / scored:6.1%}" if scored else "     -"
    cells = " ".join(f"{count[c]:>10}" for c in columns)
    print(f"{module:34} {mutants:>7} {cells}  {score}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [-h] [--resume | --survivors] [--budget SECONDS] [--summary]"
        " [patterns ...] [-- pytest arguments]",
    )
    parser.add_argument(
        "patterns", nargs="*", help="mutant names or globs to run (default: every mutant)"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--resume", action="store_true", help="skip mutants that have a result")
    which.add_argument(
        "--survivors",
        action="store_true",
        help="run only the mutants that survived (but are not equivalent), had no test or"
        " have no result",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="the test time (clean durations) a mutant gets at most; 0: every test that"
        " reaches its function (default: %(default)s)",
    )
    parser.add_argument(
        "--summary", action="store_true", help="print the stored results; run nothing"
    )
    argv = sys.argv[1:]
    # After --: pytest arguments that replace the configured test selection.
    tests = argv[argv.index("--") + 1 :] if "--" in argv else None
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    os.chdir(ROOT)
    os.environ.setdefault("MM_TEST_DATABASES", "default,postgres")
    from mutmut.configuration import config

    if args.summary:
        from mutmut.utils.file_utils import walk_mutatable_files

        return summary(walk_mutatable_files())
    files = generate()
    os.environ["PY_IGNORE_IMPORTMISMATCH"] = "1"
    start = time.monotonic()
    os.chdir(MUTANTS)
    try:
        code = pytest.main(
            [
                "--rootdir=.",
                "-q",
                "--tb=line",
                *config().pytest_add_cli_args,
                *(config().pytest_add_cli_args_test_selection if tests is None else tests),
            ],
            plugins=[
                _ConfigKeeper(),
                MutationRunner(
                    files,
                    args.patterns,
                    resume=args.resume,
                    survivors=args.survivors,
                    budget=args.budget,
                ),
            ],
        )
    finally:
        os.chdir(ROOT)
    print(f"\nwall time {(time.monotonic() - start) / 60:.1f} min (pytest exit code {code})")
    return summary(files)


if __name__ == "__main__":
    sys.exit(main())
