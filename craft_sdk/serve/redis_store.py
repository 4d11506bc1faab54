"""The server's meters in Redis (``pip install 'craft-sdk[redis]'``): the :class:`~craft_sdk.serve.store.Store`
contract with every check-and-charge a server-side Lua script, so it is atomic across processes and machines.

Keys (prefix ``craft:``; every name and idempotency key percent-escaped, so no two tenants' records
can share a Redis key): ``usage:<key>`` hash {used, uploads, budget}; ``idem:<key>:<idem>`` hash
{request, status, owner, digest, answer} expiring after a day; ``instance:<owner>`` a lease that
expires; ``settings`` hash {default_budget, secret, format}.

Persistence: the meters are money, so Redis must keep them across its restarts (``appendonly yes``,
or RDB snapshots with ``save``) and must never evict them (``maxmemory-policy noeviction``). The store
checks both at start-up where Redis reports them (``CONFIG GET``; tolerated when CONFIG is disabled),
and if the records vanish anyway (a FLUSHALL, a restart without persistence) every metered call
raises :class:`~craft_sdk.errors.StoreError` instead of serving unlimited.

The password never goes in the URL on a command line: it is read from ``CRAFT_REDIS_PASSWORD``, or
from the file named by ``CRAFT_REDIS_PASSWORD_FILE``.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from ..errors import ConfigError, StoreError, require
from .storebase import (
    IDEMPOTENCY_TTL_S,
    LOST,
    MAX_BUDGET,
    Begin,
    Store,
    check_budget,
    check_top_up,
    new_store_budget,
    report_usage,
    stored_int,
)

logger = logging.getLogger(__name__)

PREFIX = "craft:"
FORMAT = 1  # 0: names unescaped (craft-sdk before the format field)
PASSWORD_ENV, PASSWORD_FILE_ENV = "CRAFT_REDIS_PASSWORD", "CRAFT_REDIS_PASSWORD_FILE"

# a budget field must be an integer from 0 to the max (a legacy float such as 150.0 counts as its integer)
_BAD_BUDGET = "local b = tonumber(budget) if b == nil or b ~= math.floor(b) or b < 0 or b > tonumber(ARGV[{max}]) then return {{'bad', budget}} end"

# KEYS: usage hash, idem hash ('' = none), settings. ARGV: n, request, owner, ttl, instance prefix, max budget
_BEGIN = """
if redis.call('EXISTS', KEYS[3]) == 0 then return {'lost'} end
if KEYS[2] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then
  local r = redis.call('HMGET', KEYS[2], 'request', 'status', 'owner', 'digest', 'answer')
  if r[1] ~= ARGV[2] then return {'mismatch'} end
  if r[2] == 'done' then return {'replay', r[4] or '', r[5] or ''} end
  if r[3] == ARGV[3] or redis.call('EXISTS', ARGV[5] .. r[3]) == 1 then return {'pending'} end
  redis.call('HSET', KEYS[2], 'owner', ARGV[3])
  return {'takeover'}
end
local budget = redis.call('HGET', KEYS[1], 'budget') or redis.call('HGET', KEYS[3], 'default_budget') or 'None'
if budget ~= 'None' then """ + _BAD_BUDGET.format(max=6) + """ end
local used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
local n = tonumber(ARGV[1])
if budget ~= 'None' and used + n > tonumber(budget) then return {'refused'} end
redis.call('HINCRBY', KEYS[1], 'used', n)
if KEYS[2] ~= '' then
  redis.call('HSET', KEYS[2], 'request', ARGV[2], 'status', 'pending', 'owner', ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return {'charged'}
"""

# KEYS: usage hash, idem hash ('' = none). ARGV: n, owner ('' = any). Integer arithmetic only (HINCRBY): no float ever stored.
# Only the owner of a pending record refunds it (one whose record was taken over refunds nothing).
_ABORT = """
if KEYS[2] ~= '' and ARGV[2] ~= '' then
  local r = redis.call('HMGET', KEYS[2], 'status', 'owner')
  if r[1] ~= 'pending' or r[2] ~= ARGV[2] then return 0 end
end
local used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
local back = math.min(used, tonumber(ARGV[1]))
if back > 0 then redis.call('HINCRBY', KEYS[1], 'used', -back) end
if KEYS[2] ~= '' then redis.call('DEL', KEYS[2]) end
return 1
"""

# KEYS: settings, usage hash, idem hash. ARGV: digest, answer ('' = none), n, ttl. A done record is kept; a pending one
# is marked done; a missing one (refunded by a failed takeover while this answer was computed) is re-created whole
# and charged again when n > 0 (the answer is delivered), never left partial, unless that passes the budget ('refused').
_FINISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'lost' end
local exists = redis.call('EXISTS', KEYS[3]) == 1
if exists and redis.call('HGET', KEYS[3], 'status') == 'done' then return 'done' end
if not exists then
  if tonumber(ARGV[3]) <= 0 then return 'gone' end
  local budget = tonumber(redis.call('HGET', KEYS[2], 'budget') or redis.call('HGET', KEYS[1], 'default_budget') or '')
  local used = tonumber(redis.call('HGET', KEYS[2], 'used') or '0')
  if budget ~= nil and used + tonumber(ARGV[3]) > budget then return 'refused' end
  redis.call('HINCRBY', KEYS[2], 'used', ARGV[3])
  redis.call('HSET', KEYS[3], 'request', ARGV[1], 'owner', '')
end
redis.call('HSET', KEYS[3], 'status', 'done', 'digest', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[3], 'answer', ARGV[2]) end
redis.call('EXPIRE', KEYS[3], ARGV[4])
if exists then return 'ok' end
return 'recharged'
"""

# KEYS: usage hash, settings. ARGV: n, max budget. Checked whole before anything is written.
_TOP_UP = """
if redis.call('EXISTS', KEYS[2]) == 0 then return {'lost'} end
local budget = redis.call('HGET', KEYS[1], 'budget') or redis.call('HGET', KEYS[2], 'default_budget') or 'None'
if budget == 'None' then return {'unlimited'} end
""" + _BAD_BUDGET.format(max=2) + """
if b + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {'over', budget} end
redis.call('HSET', KEYS[1], 'budget', string.format('%.0f', b + tonumber(ARGV[1])))
return {'ok'}
"""


def _name(component: str) -> str:
    """``component`` percent-escaped: no ``:``, ``{``, ``}``, space or non-ASCII left, so keys never collide."""
    return quote(component, safe="")


def _password(url: str) -> str | None:
    """The password for ``url`` when the URL holds none: ``CRAFT_REDIS_PASSWORD`` or the file ``CRAFT_REDIS_PASSWORD_FILE``."""
    if urlsplit(url).password is not None:
        return None
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    path = os.environ.get(PASSWORD_FILE_ENV)
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{PASSWORD_FILE_ENV}={path} cannot be read ({exc.__class__.__name__}); it must hold the Redis password") from None


class RedisStore(Store):
    """Meters in Redis, shared by every server process (on any machine) that points at it.

    Args:
        url: ``redis://host:port/db`` (or ``rediss://``, ``unix://``); the password from the environment
            (``CRAFT_REDIS_PASSWORD`` or ``CRAFT_REDIS_PASSWORD_FILE``), not the URL.
        default_budget: queries per key unless a key has a budget of its own; None keeps the stored value.
        timeout_s: seconds one Redis call may take.
        create: False refuses a Redis that holds no craft-sdk state (``serve-keys`` on a wrong URL).
        budget_required: refuse a Redis that holds no craft-sdk state (new, or flushed) when ``default_budget`` is
            None, unless ``unlimited`` (``craft-sdk serve``: ``--budget-per-key N`` or ``--no-budget``); nothing written.
        unlimited: store "no budget" as the default, explicitly (``--no-budget``).

    Example:
        >>> store = RedisStore("redis://127.0.0.1:6379/0", default_budget=8000)   # doctest: +SKIP
    """

    def __init__(self, url: str, default_budget: int | None = None, lease_s: float = 10.0, *,
                 timeout_s: float = 10.0, create: bool = True, budget_required: bool = False, unlimited: bool = False) -> None:
        check_budget(default_budget)
        new_store_budget("", default_budget, False, unlimited)
        redis = require("redis", "redis", "a redis:// state")
        self.lease_s, self.url = lease_s, _safe(url)
        self._redis = redis.Redis.from_url(url, password=_password(url), decode_responses=True, socket_timeout=timeout_s,
                                           socket_connect_timeout=min(5.0, timeout_s))
        self._settings = PREFIX + "settings"
        try:
            self._open(default_budget, create, budget_required, unlimited)
            self.warnings = self.persistence_problems()
        except redis.RedisError as exc:
            raise ConfigError(f"cannot reach the Redis state at {self.url}: {str(exc).splitlines()[0][:120]}; is redis-server running?") from None
        for warning in self.warnings:
            logger.warning("%s", warning)
        self._begin = self._redis.register_script(_BEGIN)
        self._abort = self._redis.register_script(_ABORT)
        self._finish = self._redis.register_script(_FINISH)
        self._top_up = self._redis.register_script(_TOP_UP)

    def _open(self, default_budget: int | None, create: bool, budget_required: bool, unlimited: bool) -> None:
        settings = self._redis.hgetall(self._settings)
        if not settings and not create:
            raise ConfigError(f"the Redis state at {self.url} holds no craft-sdk state (never served, or its data was lost); check --state")
        if not settings:
            new_store_budget(f"the Redis state at {self.url}", default_budget, budget_required, unlimited)
        fmt = settings.get("format", "0" if settings else str(FORMAT))
        if not fmt.isdigit() or int(fmt) > FORMAT:
            raise ConfigError(f"the Redis state at {self.url} has format {fmt!r}, written by a newer craft-sdk; upgrade craft-sdk")
        if int(fmt) < FORMAT:
            self._migrate_names()
        if not settings:
            logger.warning("the Redis state at %s held no craft-sdk state; starting a new one (default budget: %s)", self.url,
                           "unlimited" if default_budget is None else default_budget)
        pipe = self._redis.pipeline()
        pipe.hsetnx(self._settings, "default_budget", "None")
        if default_budget is not None or unlimited:
            pipe.hset(self._settings, "default_budget", str(default_budget))
        pipe.hsetnx(self._settings, "secret", secrets.token_hex(32))
        pipe.hset(self._settings, "format", str(FORMAT))
        pipe.execute()

    def _migrate_names(self) -> None:
        """Format 0 -> 1 in one transaction: every ``usage:<name>`` renamed to its escaped name, in two steps
        (through a temporary name) so an old name that looks escaped (``a%3Ab``) is never overwritten by the
        escaped form of another (``a:b``); the old idempotency records are dropped, since ``idem:<key>:<idem>``
        cannot be split unambiguously when names hold ``:`` (a replay of one is computed, and billed, again)."""
        start = len(self._usage_key(""))
        old = list(self._redis.scan_iter(PREFIX + "usage:*", count=1000))
        idem = list(self._redis.scan_iter(PREFIX + "idem:*", count=1000))
        pipe = self._redis.pipeline(transaction=True)  # MULTI/EXEC: all of it, or (a crash before EXEC) none
        for i, k in enumerate(old):
            pipe.rename(k, f"{PREFIX}migrating:{i}")
        for i, k in enumerate(old):
            pipe.rename(f"{PREFIX}migrating:{i}", self._usage_key(k[start:]))
        if idem:
            pipe.delete(*idem)
        pipe.hset(self._settings, "format", str(FORMAT))
        pipe.execute()
        logger.warning("the Redis state at %s was upgraded to format %d: %d key meters renamed, %d idempotency records of the "
                       "previous version dropped", self.url, FORMAT, len(old), len(idem))

    def persistence_problems(self) -> list[str]:
        """What in Redis' configuration can lose meters (no AOF and no RDB, evicting keys); [] when CONFIG is disabled."""
        import redis

        try:
            config = self._redis.config_get("appendonly") | self._redis.config_get("save") | self._redis.config_get("maxmemory-policy")
        except redis.ResponseError:  # CONFIG renamed or disabled (managed Redis): nothing to check here
            return []
        problems = []
        if config.get("appendonly") == "no" and not config.get("save"):
            problems.append(f"the Redis state at {self.url} persists nothing (appendonly no, save ''): a Redis restart "
                            "loses every meter; set appendonly yes (or RDB snapshots with save)")
        if config.get("maxmemory-policy", "noeviction") != "noeviction":
            problems.append(f"the Redis state at {self.url} may evict meters (maxmemory-policy {config['maxmemory-policy']}); "
                            "set maxmemory-policy noeviction")
        return problems

    @staticmethod
    def _usage_key(key: str) -> str:
        return f"{PREFIX}usage:{_name(key)}"

    @staticmethod
    def _idem_key(key: str, idem: str | None) -> str:
        return "" if idem is None else f"{PREFIX}idem:{_name(key)}:{_name(idem)}"

    def begin(self, key: str, idem: str | None, request: str, n: int, owner: str) -> Begin:
        out = self._begin(
            keys=[self._usage_key(key), self._idem_key(key, idem), self._settings],
            args=[n, request, owner, IDEMPOTENCY_TTL_S, f"{PREFIX}instance:", MAX_BUDGET],
        )
        if out[0] == "lost":
            raise StoreError(LOST)
        if out[0] == "bad":
            stored_int(out[1], key)  # raises the one-line reason
        if out[0] == "replay":
            return Begin("replay", out[1] or None, base64.b64decode(out[2]) if out[2] else None)
        return Begin(out[0])

    def finish(self, key: str, idem: str, digest: str, answer: bytes | None = None, n: int = 0) -> bool:
        encoded = "" if answer is None else base64.b64encode(answer).decode()
        out = self._finish(keys=[self._settings, self._usage_key(key), self._idem_key(key, idem)],
                           args=[digest, encoded, n, IDEMPOTENCY_TTL_S])
        if out == "lost":
            raise StoreError(LOST)
        if out == "recharged":
            logger.warning("key %r: the record of Idempotency-Key %s was refunded by another process while this one computed "
                           "it; the answer delivered is billed again (%d queries)", key, idem, n)
        return out != "refused"

    def abort(self, key: str, idem: str | None, n: int, owner: str | None = None) -> None:
        self._abort(keys=[self._usage_key(key), self._idem_key(key, idem)], args=[n, owner or ""])

    def count_upload(self, key: str) -> None:
        self._redis.hincrby(self._usage_key(key), "uploads", 1)

    def usage(self, key: str) -> dict[str, Any]:
        pipe = self._redis.pipeline()
        pipe.hgetall(self._usage_key(key))
        pipe.hget(self._settings, "default_budget")
        row, default = pipe.execute()
        if default is None:
            raise StoreError(LOST)
        budget = row.get("budget", default)
        used, uploads = stored_int(row.get("used", 0), key, "used queries"), stored_int(row.get("uploads", 0), key, "uploads")
        return report_usage(used, uploads, None if budget == "None" else stored_int(budget, key if "budget" in row else None))

    def beat(self, owner: str) -> None:
        self._redis.set(f"{PREFIX}instance:{owner}", "1", px=int(self.lease_s * 1000))

    def ping(self) -> None:
        if not self._redis.exists(self._settings):
            raise StoreError(LOST)

    def secret(self) -> bytes:
        value = self._redis.hget(self._settings, "secret")
        if value is None:
            raise StoreError(LOST)
        return bytes.fromhex(value)

    def keys(self) -> list[str]:
        start = len(self._usage_key(""))
        return sorted(unquote(k[start:]) for k in self._redis.scan_iter(PREFIX + "usage:*", count=1000))

    def top_up(self, key: str, n: int) -> None:
        check_top_up(key, 0, n)  # n itself, before anything is sent
        out = self._top_up(keys=[self._usage_key(key), self._settings], args=[n, MAX_BUDGET])
        if out[0] == "lost":
            raise StoreError(LOST)
        if out[0] == "bad":
            stored_int(out[1], key)  # raises the one-line reason
        if out[0] != "ok":
            check_top_up(key, None if out[0] == "unlimited" else int(out[1]), n)  # raises the one-line reason

    def set_budget(self, key: str, budget: int | None) -> None:
        check_budget(budget)
        if budget is None:
            self._redis.hdel(self._usage_key(key), "budget")
        else:
            self._redis.hset(self._usage_key(key), "budget", budget)

    def reset(self, key: str) -> None:
        self._redis.hset(self._usage_key(key), "used", 0)

    def close(self) -> None:
        self._redis.close()


def _safe(url: str) -> str:
    """``url`` without a password."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"
