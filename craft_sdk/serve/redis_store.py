"""The server's meters in Redis (``pip install 'craft-sdk[redis]'``): the :class:`~craft_sdk.serve.store.Store`
contract with every check-and-charge a server-side Lua script, so it is atomic across processes and machines.

Keys (prefix ``craft:``): ``usage:<key>`` hash {used, uploads, budget}; ``idem:<key>:<idem>`` hash
{request, status, owner, digest} expiring after a day; ``instance:<owner>`` a lease that expires;
``settings`` hash {default_budget, secret}.
"""

from __future__ import annotations

import secrets
from typing import Any

from ..errors import ConfigError
from .store import IDEMPOTENCY_TTL_S, Begin, Store, _check_budget, _report

PREFIX = "craft:"

# KEYS: usage hash, idem hash ('' = none), settings. ARGV: n, request, owner, ttl, instance prefix
_BEGIN = """
if KEYS[2] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then
  local r = redis.call('HMGET', KEYS[2], 'request', 'status', 'owner', 'digest')
  if r[1] ~= ARGV[2] then return {'mismatch'} end
  if r[2] == 'done' then return {'replay', r[4]} end
  if r[3] == ARGV[3] or redis.call('EXISTS', ARGV[5] .. r[3]) == 1 then return {'pending'} end
  redis.call('HSET', KEYS[2], 'owner', ARGV[3])
  return {'takeover'}
end
local budget = redis.call('HGET', KEYS[1], 'budget') or redis.call('HGET', KEYS[3], 'default_budget') or 'None'
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

# KEYS: usage hash, idem hash ('' = none). ARGV: n
_ABORT = """
local used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
redis.call('HSET', KEYS[1], 'used', math.max(0, used - tonumber(ARGV[1])))
if KEYS[2] ~= '' then redis.call('DEL', KEYS[2]) end
return 1
"""

# KEYS: usage hash, settings. ARGV: n
_TOP_UP = """
local budget = redis.call('HGET', KEYS[1], 'budget') or redis.call('HGET', KEYS[2], 'default_budget') or 'None'
if budget == 'None' then return -1 end
redis.call('HSET', KEYS[1], 'budget', tonumber(budget) + tonumber(ARGV[1]))
return 1
"""


class RedisStore(Store):
    """Meters in Redis, shared by every server process (on any machine) that points at it.

    Args:
        url: ``redis://host:port/db`` (or ``rediss://``, ``unix://``).
        default_budget: queries per key unless a key has a budget of its own; None = unlimited.

    Example:
        >>> store = RedisStore("redis://127.0.0.1:6379/0", default_budget=8000)   # doctest: +SKIP
    """

    def __init__(self, url: str, default_budget: int | None = None, lease_s: float = 10.0, *, keep_default: bool = False) -> None:
        _check_budget(default_budget)
        try:
            import redis
        except ImportError:
            raise ConfigError("a redis:// state needs the redis client: pip install 'craft-sdk[redis]'") from None
        self.lease_s = lease_s
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5)
        self._settings = PREFIX + "settings"
        try:
            if not keep_default:
                self._redis.hset(self._settings, "default_budget", str(default_budget))
            self._redis.hsetnx(self._settings, "secret", secrets.token_hex(32))
        except redis.RedisError as exc:
            raise ConfigError(f"cannot reach the Redis state at {_safe(url)}: {str(exc).splitlines()[0][:120]}; is redis-server running?") from None
        self._begin = self._redis.register_script(_BEGIN)
        self._abort = self._redis.register_script(_ABORT)
        self._top_up = self._redis.register_script(_TOP_UP)

    @staticmethod
    def _usage_key(key: str) -> str:
        return f"{PREFIX}usage:{key}"

    @staticmethod
    def _idem_key(key: str, idem: str | None) -> str:
        return "" if idem is None else f"{PREFIX}idem:{key}:{idem}"

    def begin(self, key: str, idem: str | None, request: str, n: int, owner: str) -> Begin:
        out = self._begin(
            keys=[self._usage_key(key), self._idem_key(key, idem), self._settings],
            args=[n, request, owner, IDEMPOTENCY_TTL_S, f"{PREFIX}instance:"],
        )
        return Begin(out[0], out[1] if len(out) > 1 else None)

    def finish(self, key: str, idem: str, digest: str) -> None:
        k = self._idem_key(key, idem)
        pipe = self._redis.pipeline()
        pipe.hset(k, mapping={"status": "done", "digest": digest})
        pipe.expire(k, IDEMPOTENCY_TTL_S)
        pipe.execute()

    def abort(self, key: str, idem: str | None, n: int) -> None:
        self._abort(keys=[self._usage_key(key), self._idem_key(key, idem)], args=[n])

    def count_upload(self, key: str) -> None:
        self._redis.hincrby(self._usage_key(key), "uploads", 1)

    def usage(self, key: str) -> dict[str, Any]:
        pipe = self._redis.pipeline()
        pipe.hgetall(self._usage_key(key))
        pipe.hget(self._settings, "default_budget")
        row, default = pipe.execute()
        budget = row.get("budget", default or "None")
        return _report(int(row.get("used", 0)), int(row.get("uploads", 0)), None if budget == "None" else int(budget))

    def beat(self, owner: str) -> None:
        self._redis.set(f"{PREFIX}instance:{owner}", "1", px=int(self.lease_s * 1000))

    def secret(self) -> bytes:
        return bytes.fromhex(self._redis.hget(self._settings, "secret"))

    def keys(self) -> list[str]:
        start = len(self._usage_key(""))
        return sorted(k[start:] for k in self._redis.scan_iter(self._usage_key("*"), count=1000))

    def top_up(self, key: str, n: int) -> None:
        if self._top_up(keys=[self._usage_key(key), self._settings], args=[n]) == -1:
            raise ConfigError(f"key {key!r} has no budget to top up (unlimited); set one with --set-budget")

    def set_budget(self, key: str, budget: int | None) -> None:
        _check_budget(budget)
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
