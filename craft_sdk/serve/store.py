"""Where the server's meters live: per-key usage and budgets, idempotency records, instance leases.

Three backends with one contract, so several server processes can share one meter:

* :class:`MemoryStore` — in this process only (a restart resets it; for tests and embedding).
* :class:`SQLiteStore` — one SQLite file in WAL mode (the CLI's default), shared by every
  process on this machine that opens it.
* :class:`~craft_sdk.serve.redis_store.RedisStore` — a Redis server (``[redis]`` extra), shared
  across machines.

The contract: :meth:`begin` is one atomic step that either finds the request's idempotency
record (a replay, a duplicate in flight, a reused key) or checks the key's remaining budget,
records the charge and a ``pending`` record. Computing happens after it; :meth:`finish` marks
the record ``done`` with the answer's digest, :meth:`abort` refunds the charge exactly and
forgets the record. A ``pending`` record whose owner stopped renewing its lease (killed) is
taken over by the next retry, which computes the answer without charging again.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

IDEMPOTENCY_TTL_S = 24 * 3600


@dataclass(frozen=True)
class Begin:
    """The outcome of :meth:`Store.begin`.

    ``status``: ``charged`` (compute; the charge is recorded), ``takeover`` (compute, already charged by a
    dead owner), ``replay`` (done before: ``digest`` of the answer), ``pending`` (a live owner is computing
    it), ``mismatch`` (the idempotency key was used for another request) or ``refused`` (over budget).
    """

    status: str
    digest: str | None = None


class Store:
    """The interface every backend implements (all methods are thread-safe and atomic)."""

    lease_s: float = 10.0

    def begin(self, key: str, idem: str | None, request: str, n: int, owner: str) -> Begin:
        raise NotImplementedError

    def finish(self, key: str, idem: str, digest: str) -> None:
        raise NotImplementedError

    def abort(self, key: str, idem: str | None, n: int) -> None:
        """Refund ``n`` queries of ``key`` and forget the pending record ``idem``."""
        raise NotImplementedError

    def count_upload(self, key: str) -> None:
        raise NotImplementedError

    def usage(self, key: str) -> dict[str, Any]:
        """``{"used", "budget", "remaining", "uploads"}`` (budget and remaining None when unlimited)."""
        raise NotImplementedError

    def beat(self, owner: str) -> None:
        """Renew ``owner``'s lease (a live server process computing pending records)."""
        raise NotImplementedError

    def secret(self) -> bytes:
        """A random secret shared by every process on this store (image-set handles are derived from it)."""
        raise NotImplementedError

    def keys(self) -> list[str]:
        """Names of every key with a meter."""
        raise NotImplementedError

    def top_up(self, key: str, n: int) -> None:
        """Raise ``key``'s budget by ``n`` queries (from the default budget when it has none of its own)."""
        raise NotImplementedError

    def set_budget(self, key: str, budget: int | None) -> None:
        """Give ``key`` a budget of its own (None: back to the server's default)."""
        raise NotImplementedError

    def reset(self, key: str) -> None:
        """Set ``key``'s used queries to 0."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _report(used: int, uploads: int, budget: int | None) -> dict[str, Any]:
    return {"used": used, "budget": budget, "remaining": None if budget is None else max(0, budget - used), "uploads": uploads}


def _check_budget(budget: int | None) -> None:
    if budget is not None and (not isinstance(budget, int) or budget < 0):
        raise ConfigError(f"a budget must be a non-negative integer or None, got {budget!r}")


class MemoryStore(Store):
    """Meters in this process (lost on restart).

    Args:
        default_budget: queries per key unless a key has a budget of its own; None = unlimited.
    """

    def __init__(self, default_budget: int | None = None, lease_s: float = 10.0) -> None:
        _check_budget(default_budget)
        self.default_budget, self.lease_s = default_budget, lease_s
        self._used: dict[str, int] = {}
        self._uploads: dict[str, int] = {}
        self._budgets: dict[str, int] = {}
        self._records: dict[tuple[str, str], dict[str, Any]] = {}
        self._beats: dict[str, float] = {}
        self._secret = secrets.token_bytes(32)
        self._lock = threading.Lock()

    def _budget(self, key: str) -> int | None:
        return self._budgets.get(key, self.default_budget)

    def begin(self, key: str, idem: str | None, request: str, n: int, owner: str) -> Begin:
        with self._lock:
            rec = self._records.get((key, idem)) if idem is not None else None
            if rec is not None:
                if rec["request"] != request:
                    return Begin("mismatch")
                if rec["status"] == "done":
                    return Begin("replay", rec["digest"])
                if rec["owner"] == owner or self._beats.get(rec["owner"], 0) > time.time() - self.lease_s:
                    return Begin("pending")
                rec["owner"] = owner
                return Begin("takeover")
            budget, used = self._budget(key), self._used.get(key, 0)
            if budget is not None and used + n > budget:
                return Begin("refused")
            self._used[key] = used + n
            if idem is not None:
                self._records[(key, idem)] = {"request": request, "status": "pending", "owner": owner, "digest": None, "t": time.time()}
            return Begin("charged")

    def finish(self, key: str, idem: str, digest: str) -> None:
        with self._lock:
            rec = self._records.get((key, idem))
            if rec is not None:
                rec.update(status="done", digest=digest)
            if len(self._records) > 4096:  # bounded: forget the oldest finished records
                old = sorted((r["t"], k) for k, r in self._records.items() if r["status"] == "done")[: len(self._records) // 2]
                for _, k in old:
                    del self._records[k]

    def abort(self, key: str, idem: str | None, n: int) -> None:
        with self._lock:
            self._used[key] = max(0, self._used.get(key, 0) - n)
            if idem is not None:
                self._records.pop((key, idem), None)

    def count_upload(self, key: str) -> None:
        with self._lock:
            self._uploads[key] = self._uploads.get(key, 0) + 1

    def usage(self, key: str) -> dict[str, Any]:
        with self._lock:
            return _report(self._used.get(key, 0), self._uploads.get(key, 0), self._budget(key))

    def beat(self, owner: str) -> None:
        with self._lock:
            self._beats[owner] = time.time()

    def secret(self) -> bytes:
        return self._secret

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(set(self._used) | set(self._uploads) | set(self._budgets))

    def top_up(self, key: str, n: int) -> None:
        with self._lock:
            base = self._budget(key)
            if base is None:
                raise ConfigError(f"key {key!r} has no budget to top up (unlimited); set one with set_budget")
            self._budgets[key] = base + n

    def set_budget(self, key: str, budget: int | None) -> None:
        _check_budget(budget)
        with self._lock:
            if budget is None:
                self._budgets.pop(key, None)
            else:
                self._budgets[key] = budget

    def reset(self, key: str) -> None:
        with self._lock:
            self._used[key] = 0


_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (key TEXT PRIMARY KEY, used INTEGER NOT NULL DEFAULT 0,
                                  uploads INTEGER NOT NULL DEFAULT 0, budget INTEGER);
CREATE TABLE IF NOT EXISTS idempotency (key TEXT NOT NULL, idem TEXT NOT NULL, request TEXT NOT NULL,
                                        status TEXT NOT NULL, owner TEXT NOT NULL, digest TEXT,
                                        created REAL NOT NULL, PRIMARY KEY (key, idem));
CREATE TABLE IF NOT EXISTS instances (owner TEXT PRIMARY KEY, beat REAL NOT NULL);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class SQLiteStore(Store):
    """Meters in one SQLite file (WAL mode), shared by every process that opens it.

    A charge is one ``BEGIN IMMEDIATE`` transaction (budget check + charge + pending record), so
    processes never overspend a budget together. ``synchronous=NORMAL``: a killed process loses
    nothing committed; a power cut may lose the last transactions.

    Args:
        path: the database file (created with its folder if missing).
        default_budget: queries per key unless a key has a budget of its own; None = unlimited.
            Stored, so ``craft-sdk serve-keys`` reports remaining budgets; None keeps the stored value.

    Example:
        >>> store = SQLiteStore("/var/lib/craft/state.db", default_budget=8000)   # doctest: +SKIP
    """

    def __init__(self, path: str | Path, default_budget: int | None = None, lease_s: float = 10.0, *, keep_default: bool = False) -> None:
        _check_budget(default_budget)
        self.path, self.lease_s = Path(path), lease_s
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            with self._tx():
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(statement)
                if not keep_default:
                    self._db.execute("INSERT OR REPLACE INTO settings VALUES ('default_budget', ?)", (str(default_budget),))
                self._db.execute("INSERT OR IGNORE INTO settings VALUES ('secret', ?)", (secrets.token_hex(32),))
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the state database {self.path}: {exc}; check the path and its permissions") from None
        self._lock = threading.Lock()
        self._finished = 0

    # one connection per store, serialised by a lock; BEGIN IMMEDIATE serialises the processes
    def _tx(self) -> Any:
        store = self

        class _Tx:
            def __enter__(self) -> sqlite3.Connection:
                store._db.execute("BEGIN IMMEDIATE")
                return store._db

            def __exit__(self, exc_type: Any, *rest: Any) -> None:
                store._db.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    def _default(self, db: sqlite3.Connection) -> int | None:
        row = db.execute("SELECT value FROM settings WHERE name = 'default_budget'").fetchone()
        return None if row is None or row[0] == "None" else int(row[0])

    def _budget(self, db: sqlite3.Connection, key: str) -> tuple[int, int, int | None]:
        row = db.execute("SELECT used, uploads, budget FROM usage WHERE key = ?", (key,)).fetchone()
        used, uploads, own = row if row is not None else (0, 0, None)
        return used, uploads, own if own is not None else self._default(db)

    def begin(self, key: str, idem: str | None, request: str, n: int, owner: str) -> Begin:
        with self._lock, self._tx() as db:
            if idem is not None:
                rec = db.execute("SELECT request, status, owner, digest FROM idempotency WHERE key = ? AND idem = ?", (key, idem)).fetchone()
                if rec is not None:
                    if rec[0] != request:
                        return Begin("mismatch")
                    if rec[1] == "done":
                        return Begin("replay", rec[3])
                    beat = db.execute("SELECT beat FROM instances WHERE owner = ?", (rec[2],)).fetchone()
                    if rec[2] == owner or (beat is not None and beat[0] > time.time() - self.lease_s):
                        return Begin("pending")
                    db.execute("UPDATE idempotency SET owner = ? WHERE key = ? AND idem = ?", (owner, key, idem))
                    return Begin("takeover")
            used, _, budget = self._budget(db, key)
            if budget is not None and used + n > budget:
                return Begin("refused")
            db.execute("INSERT INTO usage (key, used) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET used = used + excluded.used", (key, n))
            if idem is not None:
                db.execute("INSERT INTO idempotency VALUES (?, ?, ?, 'pending', ?, NULL, ?)", (key, idem, request, owner, time.time()))
            return Begin("charged")

    def finish(self, key: str, idem: str, digest: str) -> None:
        with self._lock, self._tx() as db:
            db.execute("UPDATE idempotency SET status = 'done', digest = ? WHERE key = ? AND idem = ?", (digest, key, idem))
            self._finished += 1
            if self._finished % 256 == 0:  # bounded: forget finished records after a day
                db.execute("DELETE FROM idempotency WHERE status = 'done' AND created < ?", (time.time() - IDEMPOTENCY_TTL_S,))

    def abort(self, key: str, idem: str | None, n: int) -> None:
        with self._lock, self._tx() as db:
            db.execute("UPDATE usage SET used = MAX(0, used - ?) WHERE key = ?", (n, key))
            if idem is not None:
                db.execute("DELETE FROM idempotency WHERE key = ? AND idem = ?", (key, idem))

    def count_upload(self, key: str) -> None:
        with self._lock, self._tx() as db:
            db.execute("INSERT INTO usage (key, uploads) VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET uploads = uploads + 1", (key,))

    def usage(self, key: str) -> dict[str, Any]:
        with self._lock:
            used, uploads, budget = self._budget(self._db, key)
        return _report(used, uploads, budget)

    def beat(self, owner: str) -> None:
        with self._lock, self._tx() as db:
            db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?)", (owner, time.time()))
            db.execute("DELETE FROM instances WHERE beat < ?", (time.time() - 100 * self.lease_s,))

    def secret(self) -> bytes:
        with self._lock:
            return bytes.fromhex(self._db.execute("SELECT value FROM settings WHERE name = 'secret'").fetchone()[0])

    def keys(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT key FROM usage ORDER BY key")]

    def top_up(self, key: str, n: int) -> None:
        with self._lock, self._tx() as db:
            _, _, budget = self._budget(db, key)
            if budget is None:
                raise ConfigError(f"key {key!r} has no budget to top up (unlimited); set one with --set-budget")
            db.execute("INSERT INTO usage (key, budget) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET budget = excluded.budget", (key, budget + n))

    def set_budget(self, key: str, budget: int | None) -> None:
        _check_budget(budget)
        with self._lock, self._tx() as db:
            db.execute("INSERT INTO usage (key, budget) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET budget = excluded.budget", (key, budget))

    def reset(self, key: str) -> None:
        with self._lock, self._tx() as db:
            db.execute("INSERT INTO usage (key) VALUES (?) ON CONFLICT(key) DO UPDATE SET used = 0", (key,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(spec: str | Path | None, default_budget: int | None = None, lease_s: float = 10.0, *, keep_default: bool = False) -> Store:
    """The store named by ``spec``: None or ``"memory"``, a SQLite file path, or ``redis://host:port/db``.

    Example:
        >>> open_store("memory", default_budget=100).usage("alice")["remaining"]
        100
    """
    if spec is None or str(spec) == "memory":
        return MemoryStore(default_budget, lease_s)
    text = str(spec)
    if text.startswith(("redis://", "rediss://", "unix://")):
        from .redis_store import RedisStore

        return RedisStore(text, default_budget, lease_s, keep_default=keep_default)
    return SQLiteStore(text, default_budget, lease_s, keep_default=keep_default)
