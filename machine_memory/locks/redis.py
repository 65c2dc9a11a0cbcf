"""Locks in Redis, through django-redis; state stays in the database.

Two keys per id (the lock, set with ``SET NX PX``; the last fencing token), changed only by
the Lua scripts below, each atomic and one round trip. Key layout, clock-seeded tokens and
the fence check: docs/design.md#redis-lock-backend.
"""

from __future__ import annotations

import datetime
import secrets
from typing import TYPE_CHECKING, Any, ClassVar

from machine_memory.conf import DEFAULTS, conf
from machine_memory.exceptions import LockLost, MachineMemoryError
from machine_memory.locks.base import Fence, LockBackend, LockInfo

if TYPE_CHECKING:
    from django.core.checks import CheckMessage
    from redis import Redis


def _redis_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    # Importable without redis-py, so that checks can report a missing django-redis as
    # E020 rather than as an unimportable LOCK_BACKEND.
    try:
        from redis.exceptions import ConnectionError, RedisError, TimeoutError
    except ImportError:
        return (), ()
    return (RedisError,), (ConnectionError, TimeoutError)


_ERRORS, _TRANSIENT_ERRORS = _redis_errors()

NAMESPACE = b"machine_memory:"

# How long the token counter outlives its lock, in seconds. Tokens are seeded by Redis's
# clock, so once the lock is over the counter only guards against that clock going back;
# without an expiry one key per id ever locked would stay forever. A holder whose lock
# expired longer ago than this, untaken, finds its token gone: its writes fail with LockLost.
TOKEN_KEEP = 3600.0

# KEYS: lock, counter. ARGV: owner, ttl (ms), nonce, counter's time beyond the lock (ms).
# The nonce makes a resent call harmless: if a client configured to retry sends the script
# again after its first reply was lost, the lock it already took is reported as taken by
# this call rather than as held by someone else (which would block the id for a whole TTL).
ACQUIRE = """
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local token = math.max((tonumber(redis.call('GET', KEYS[2])) or 0) + 1, now_us)
local expires_us = now_us + tonumber(ARGV[2]) * 1000
local counter_ms = tonumber(ARGV[2]) + tonumber(ARGV[4])
local value = string.format('%d:%d:%d:', token, now_us, expires_us) .. ARGV[3] .. ':' .. ARGV[1]
if redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[2]) then
    redis.call('SET', KEYS[2], string.format('%d', token), 'PX', counter_ms)
    return token
end
local held = redis.call('GET', KEYS[1])
local held_token, nonce = string.match(held, '^(%d+):%d+:%d+:(%x*):')
if nonce == ARGV[3] then
    return tonumber(held_token)
end
return false
"""

# KEYS: lock. ARGV: owner. 1: released (or free); 0: another owner holds it (untouched).
RELEASE = """
local held = redis.call('GET', KEYS[1])
if not held then
    return 1
end
if string.match(held, '^%d+:%d+:%d+:%x*:(.*)$') == ARGV[1] then
    redis.call('DEL', KEYS[1])
    return 1
end
return 0
"""

# KEYS: lock, counter. ARGV: owner, token, ttl (ms), counter's time beyond the lock (ms).
# The value is rewritten with the new expiry, so that lock_info() reads both times with one
# GET; the counter's expiry moves with it.
EXTEND = """
local held = redis.call('GET', KEYS[1])
if not held then
    return 0
end
local token, acquired, nonce, owner = string.match(held, '^(%d+):(%d+):%d+:(%x*):(.*)$')
if token ~= ARGV[2] or owner ~= ARGV[1] then
    return 0
end
local now = redis.call('TIME')
local expires_us = tonumber(now[1]) * 1000000 + tonumber(now[2]) + tonumber(ARGV[3]) * 1000
local value = token .. ':' .. acquired .. ':' .. string.format('%d', expires_us) .. ':'
redis.call('SET', KEYS[1], value .. nonce .. ':' .. owner, 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[4]))
return 1
"""

# KEYS: lock. The lock as it was and Redis's now, or nothing when no lock is live.
FORCE_RELEASE = """
local held = redis.call('GET', KEYS[1])
if not held then
    return false
end
redis.call('DEL', KEYS[1])
local now = redis.call('TIME')
return {held, now[1] * 1000000 + now[2]}
"""


def _ms(seconds: float) -> int:
    # PX takes whole milliseconds. Rounded, not truncated: 1.005 s is 1005 ms (1.005 * 1000
    # is 1004.999…), and the shortest TTL, 1 ms, stays 1 ms.
    return max(1, round(seconds * 1000))


EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _from_us(micros: bytes | int) -> datetime.datetime:
    # Integer arithmetic: a float of seconds since 1970 cannot hold every microsecond.
    return EPOCH + datetime.timedelta(microseconds=int(micros))


def _parse(value: bytes | str) -> tuple[int, bytes, bytes, str]:
    """token, acquired (µs), expires (µs), owner of a lock value."""
    if isinstance(value, str):  # a client configured with decode_responses=True
        value = value.encode("utf-8", "surrogatepass")
    token, acquired, expires, _nonce, owner = value.split(b":", 4)
    return int(token), acquired, expires, owner.decode("utf-8", "surrogatepass")


class RedisLockBackend(LockBackend):
    errors: ClassVar[tuple[type[BaseException], ...]] = _ERRORS
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = _TRANSIENT_ERRORS
    # No index of every lock (SCAN would be unbounded work); force_release is one script.
    supports_force_release: ClassVar[bool] = True

    def __init__(self, *, database: str | None, cache: str | None = None) -> None:
        super().__init__(database=database)
        self.cache = conf.REDIS_CACHE if cache is None else cache
        self.client = self._connect(self.cache)
        self.prefix = self._key_prefix(self.cache) + NAMESPACE
        self.token_keep = TOKEN_KEEP
        # register_script only computes the SHA; nothing is sent until the first call.
        self._acquire = self.client.register_script(ACQUIRE)
        self._release = self.client.register_script(RELEASE)
        self._extend = self.client.register_script(EXTEND)
        self._force_release = self.client.register_script(FORCE_RELEASE)

    @staticmethod
    def _connect(alias: str) -> Redis:
        from django.core.cache import InvalidCacheBackendError

        try:
            from django_redis import get_redis_connection
        except ImportError:
            raise MachineMemoryError(
                'The "redis" lock backend needs django-redis: pip install '
                '"django-machine-memory[redis]", or set MACHINE_MEMORY["LOCK_BACKEND"] = '
                '"database".'
            ) from None
        try:
            # write=True: the primary, also for reads (a replica may lag behind a lock).
            client: Redis = get_redis_connection(alias, write=True)
        except InvalidCacheBackendError:
            raise MachineMemoryError(
                f"CACHES has no alias {alias!r} for the Redis lock backend; add a "
                "django_redis.cache.RedisCache entry or set MACHINE_MEMORY['REDIS_CACHE']."
            ) from None
        except NotImplementedError:
            raise MachineMemoryError(
                f"CACHES[{alias!r}] is not a django-redis cache; the Redis lock backend needs "
                "BACKEND = 'django_redis.cache.RedisCache'."
            ) from None
        return client

    @staticmethod
    def _key_prefix(alias: str) -> bytes:
        from django.core.cache import caches

        prefix = caches[alias].key_prefix
        return f"{prefix}:".encode() if prefix else b""

    def lock_key(self, machine_id: str) -> bytes:
        return self.prefix + b"lock:{" + machine_id.encode() + b"}"

    def token_key(self, machine_id: str) -> bytes:
        return self.prefix + b"token:{" + machine_id.encode() + b"}"

    @staticmethod
    def _owner(owner: str) -> bytes:
        # Owners are any str (validated for length only); keep them byte-exact.
        return owner.encode("utf-8", "surrogatepass")

    def acquire(self, machine_id: str, owner: str, ttl: float) -> int | None:
        token = self._acquire(
            keys=[self.lock_key(machine_id), self.token_key(machine_id)],
            args=[self._owner(owner), _ms(ttl), secrets.token_hex(8), _ms(self.token_keep)],
        )
        return None if token is None else int(token)

    def release(self, machine_id: str, owner: str) -> bool:
        return bool(self._release(keys=[self.lock_key(machine_id)], args=[self._owner(owner)]))

    def extend(self, machine_id: str, owner: str, token: int, ttl: float) -> bool:
        return bool(
            self._extend(
                keys=[self.lock_key(machine_id), self.token_key(machine_id)],
                args=[self._owner(owner), token, _ms(ttl), _ms(self.token_keep)],
            )
        )

    def info(self, machine_id: str) -> LockInfo | None:
        # The value carries both times, so one GET; Redis returns nothing once it expired.
        value = self.client.get(self.lock_key(machine_id))
        if value is None:
            return None
        token, acquired, expires, owner = _parse(value)
        return LockInfo(owner, token, _from_us(acquired), _from_us(expires))

    def force_release(self, machine_id: str) -> LockInfo | None:
        # Deleting the key is enough: the counter stays, so the holder's writes fail with
        # LockLost once another owner has acquired the lock, as after an expiry.
        released = self._force_release(keys=[self.lock_key(machine_id)])
        if released is None:
            return None
        value, now = released
        token, acquired, _, owner = _parse(value)
        return LockInfo(owner, token, _from_us(acquired), _from_us(now))

    def _lost(self, machine_id: str, owner: str, token: int) -> str | None:
        """Why the lock with ``token`` is no longer this owner's, or None while it is.

        One MGET (atomic, one round trip). The counter decides: it stands at ``token`` until
        someone acquires the lock again. An expired lock that nobody took is still ours, as
        with database locks. A counter below the token (or gone) means Redis lost the token
        history, or the token was never issued here: treated as lost, so nobody writes on
        the strength of a lock Redis no longer knows about.
        """
        held, counter = self.client.mget(self.lock_key(machine_id), self.token_key(machine_id))
        last = None if counter is None else int(counter)
        if last is not None and last > token:
            return f"another owner acquired it since (token {last})"
        if last != token:
            return (
                "Redis no longer has its token (flushed, restarted without persistence, or "
                "failed over) or never issued it"
            )
        if held is not None:
            held_token, _, _, held_owner = _parse(held)
            if (held_token, held_owner) != (token, owner):
                return "Redis holds it for another owner"
        return None

    def fence(self, machine_id: str, owner: str, token: int) -> Fence:
        reason = self._lost(machine_id, owner, token)
        if reason is not None:
            raise LockLost(
                machine_id,
                None,
                None,
                f"Machine {machine_id!r}: this worker's Redis lock (token {token}) is lost: "
                f"{reason}. Nothing was written; drop the event, it will be redelivered.",
            )
        # The state row keeps the highest token that wrote it and refuses a lower one in the
        # same statement as the version check: that closes the gap between this check and
        # the write.
        return Fence(fence_token=token)

    def is_lost(self, machine_id: str, owner: str, token: int) -> bool:
        return self._lost(machine_id, owner, token) is not None

    def recover(self) -> None:
        # redis-py already drops a connection whose command failed. Idle connections of the
        # pool may be dead as well (a restarted server, a failover behind the same address):
        # drop them too, so the next call opens a fresh one. Connections in use by other
        # threads are left alone.
        self.client.connection_pool.disconnect(inuse_connections=False)

    @classmethod
    def check(cls, database: str) -> list[CheckMessage]:
        from django.conf import settings
        from django.core.checks import Error
        from django.utils.module_loading import import_string

        alias: Any = conf.raw.get("REDIS_CACHE", DEFAULTS["REDIS_CACHE"])
        if not isinstance(alias, str) or not alias:
            return []  # machine_memory.E012
        try:
            from django_redis.cache import RedisCache
        except ImportError:
            return [
                Error(
                    'MACHINE_MEMORY["LOCK_BACKEND"] is "redis", but django-redis is not installed.',
                    hint='pip install "django-machine-memory[redis]", or use the "database" '
                    "lock backend.",
                    id="machine_memory.E020",
                )
            ]
        caches: dict[str, Any] = getattr(settings, "CACHES", {})
        if alias not in caches:
            return [
                Error(
                    f"MACHINE_MEMORY['REDIS_CACHE'] is {alias!r}, which is not in settings.CACHES.",
                    hint=f"Add a CACHES[{alias!r}] entry with BACKEND "
                    "'django_redis.cache.RedisCache', or point REDIS_CACHE at one.",
                    id="machine_memory.E021",
                )
            ]
        backend = caches[alias].get("BACKEND", "")
        try:
            backend_class = import_string(backend)
        except ImportError:
            backend_class = None
        if not (isinstance(backend_class, type) and issubclass(backend_class, RedisCache)):
            return [
                Error(
                    f"CACHES[{alias!r}] uses {backend!r}, which is not a django-redis cache.",
                    hint="The Redis lock backend needs BACKEND 'django_redis.cache.RedisCache' "
                    "(Django's own django.core.cache.backends.redis.RedisCache does not give "
                    "access to its client); or point MACHINE_MEMORY['REDIS_CACHE'] at another "
                    "alias.",
                    id="machine_memory.E022",
                )
            ]
        return []
