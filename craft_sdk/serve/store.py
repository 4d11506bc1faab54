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

import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, StoreError
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

__all__ = ["IDEMPOTENCY_TTL_S", "LOST", "MAX_BUDGET", "Begin", "MemoryStore", "SQLiteStore", "Store", "check_top_up", "open_store"]

class MemoryStore(Store):
    """Meters in this process (lost on restart; one process only, so never behind ``--workers``).

    Args:
        default_budget: queries per key unless a key has a budget of its own; None = unlimited.
        answer_bytes: total bytes of finished answers kept for replays; beyond it the oldest finished
            records are forgotten whole (a replay of one is then a new request, billed again).
    """

    def __init__(self, default_budget: int | None = None, lease_s: float = 10.0, answer_bytes: int = 256 << 20) -> None:
        check_budget(default_budget)
        self.default_budget, self.lease_s, self.answer_bytes = default_budget, lease_s, answer_bytes
        self._used: dict[str, int] = {}
        self._uploads: dict[str, int] = {}
        self._budgets: dict[str, int] = {}
        self._records: dict[tuple[str, str], dict[str, Any]] = {}
        self._kept = 0  # bytes of answers in _records
        self._beats: dict[str, float] = {}
        self._secret = secrets.token_bytes(32)
        self._lock = threading.Lock()

    def _budget(self, key: str) -> int | None:
        return self._budgets.get(key, self.default_budget)

    def begin(self, key: str, idem: str | None, request: str, n: int, owner: str) -> Begin:
        with self._lock:
            rec = self._records.get((key, idem)) if idem is not None else None
            if rec is not None and rec["t"] < time.time() - IDEMPOTENCY_TTL_S:
                self._forget((key, idem))  # type: ignore[arg-type]
                rec = None
            if rec is not None:
                if rec["request"] != request:
                    return Begin("mismatch")
                if rec["status"] == "done":
                    return Begin("replay", rec["digest"], rec["answer"])
                if rec["owner"] == owner or self._beats.get(rec["owner"], 0) > time.time() - self.lease_s:
                    return Begin("pending")
                rec["owner"] = owner
                return Begin("takeover")
            budget, used = self._budget(key), self._used.get(key, 0)
            if budget is not None and used + n > budget:
                return Begin("refused")
            self._used[key] = used + n
            if idem is not None:
                self._records[(key, idem)] = {"request": request, "status": "pending", "owner": owner, "digest": None,
                                              "answer": None, "t": time.time()}
            return Begin("charged")

    def _forget(self, slot: tuple[str, str]) -> None:
        rec = self._records.pop(slot, None)
        if rec is not None and rec["answer"] is not None:
            self._kept -= len(rec["answer"])

    def finish(self, key: str, idem: str, digest: str, answer: bytes | None = None, n: int = 0) -> bool:
        with self._lock:
            rec = self._records.get((key, idem))
            if rec is None and n > 0:  # refunded by a failed takeover while this answer was computed: bill it again
                budget, used = self._budget(key), self._used.get(key, 0)
                if budget is not None and used + n > budget:
                    return False  # over the budget: not billed, not delivered
                self._used[key] = used + n
                rec = self._records[(key, idem)] = {"request": digest, "status": "pending", "owner": "", "digest": None,
                                                    "answer": None, "t": time.time()}
            if rec is not None and rec["status"] != "done":
                rec.update(status="done", digest=digest, answer=answer)
                self._kept += len(answer or b"")
            if len(self._records) > 65536 or self._kept > self.answer_bytes:  # bounded: forget the oldest finished records
                for _, slot in sorted((r["t"], k) for k, r in self._records.items() if r["status"] == "done"):
                    if len(self._records) <= 32768 and self._kept <= self.answer_bytes // 2:
                        break
                    self._forget(slot)
            return True

    def abort(self, key: str, idem: str | None, n: int, owner: str | None = None) -> None:
        with self._lock:
            rec = self._records.get((key, idem)) if idem is not None else None
            if owner is not None and idem is not None and (rec is None or rec["status"] != "pending" or rec["owner"] != owner):
                return  # taken over (or finished) by another process: its charge is not ours to refund
            self._used[key] = max(0, self._used.get(key, 0) - n)
            if idem is not None:
                self._forget((key, idem))

    def count_upload(self, key: str) -> None:
        with self._lock:
            self._uploads[key] = self._uploads.get(key, 0) + 1

    def usage(self, key: str) -> dict[str, Any]:
        with self._lock:
            return report_usage(self._used.get(key, 0), self._uploads.get(key, 0), self._budget(key))

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
            self._budgets[key] = check_top_up(key, self._budget(key), n)

    def set_budget(self, key: str, budget: int | None) -> None:
        check_budget(budget)
        with self._lock:
            if budget is None:
                self._budgets.pop(key, None)
            else:
                self._budgets[key] = budget

    def reset(self, key: str) -> None:
        with self._lock:
            self._used[key] = 0


FORMAT = 1  # the SQLite state format this version writes (0: craft-sdk before the craft_meta table)
MAGIC = "craft-sdk-state"
_V0_COLUMNS = {"usage": {"key", "used", "uploads", "budget"}, "idempotency": {"key", "idem", "request", "status", "owner", "digest", "created"},
               "instances": {"owner", "beat"}, "settings": {"name", "value"}}  # format 0, column for column
_SCHEMA = f"""
CREATE TABLE craft_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO craft_meta VALUES ('magic', '{MAGIC}'), ('format', '{FORMAT}');
CREATE TABLE usage (key TEXT PRIMARY KEY, used INTEGER NOT NULL DEFAULT 0,
                    uploads INTEGER NOT NULL DEFAULT 0, budget INTEGER);
CREATE TABLE idempotency (key TEXT NOT NULL, idem TEXT NOT NULL, request TEXT NOT NULL,
                          status TEXT NOT NULL, owner TEXT NOT NULL, digest TEXT,
                          created REAL NOT NULL, answer BLOB, PRIMARY KEY (key, idem));
CREATE TABLE instances (owner TEXT PRIMARY KEY, beat REAL NOT NULL);
CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO settings VALUES ('default_budget', 'None')
"""
# format N -> N + 1, each one transaction; a store of an older format is upgraded when a server opens it
_MIGRATIONS = {
    0: f"""
ALTER TABLE idempotency ADD COLUMN answer BLOB;
CREATE TABLE craft_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO craft_meta VALUES ('magic', '{MAGIC}'), ('format', '1');
INSERT OR IGNORE INTO settings VALUES ('default_budget', 'None')
""",
}


def _statements(script: str) -> list[str]:
    return [s for s in script.split(";") if s.strip()]


def _format_of(db: sqlite3.Connection, path: Path) -> int | None:
    """The craft-sdk state format of ``db`` (None: an empty database), or a ConfigError for anything else."""
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError:
        raise ConfigError(f"{path} is not a SQLite database; point --state at a new file or an existing craft-sdk state") from None
    if not tables:
        objects = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if objects or db.execute("PRAGMA application_id").fetchone()[0] or db.execute("PRAGMA user_version").fetchone()[0]:
            raise ConfigError(f"{path} is not a craft-sdk state database (it holds another application's schema); point --state at a new file")
        return None
    if "craft_meta" in tables:
        meta = dict(db.execute("SELECT name, value FROM craft_meta").fetchall())
        if meta.get("magic") == MAGIC and str(meta.get("format", "")).isdigit():
            return int(meta["format"])
    elif set(tables) == set(_V0_COLUMNS) and all({r[1] for r in db.execute(f"PRAGMA table_info({t})")} == cols for t, cols in _V0_COLUMNS.items()):
        return 0
    shown = ", ".join(sorted(tables)[:5])
    raise ConfigError(f"{path} is not a craft-sdk state database (it holds tables {shown}); point --state at a new file")


def _private(path: Path) -> None:
    """Make the database and its -wal and -shm files readable by their owner only (0600)."""
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            if p.exists() and p.stat().st_mode & 0o077:
                p.chmod(0o600)
        except OSError:
            pass


class SQLiteStore(Store):
    """Meters in one SQLite file (WAL mode), shared by every process that opens it.

    A charge is one ``BEGIN IMMEDIATE`` transaction (budget check + charge + pending record), so
    processes never overspend a budget together. ``synchronous=NORMAL``: a killed process loses
    nothing committed; a power cut may lose the last transactions. The file and its ``-wal`` and
    ``-shm`` are mode 0600. A file that is not a craft-sdk state (another application's database)
    is refused before anything is written; one of an older format is upgraded in place, one of a
    newer format refused.

    Args:
        path: the database file (created with its folder if missing, unless ``create`` is False).
        default_budget: queries per key unless a key has a budget of its own. Stored, so every process
            and ``craft-sdk serve-keys`` see it; None keeps the stored value (unlimited in a new store).
        timeout_s: seconds to wait for another process's transaction before giving up.
        create: False refuses a missing file (``serve-keys`` on a mistyped path).
        budget_required: refuse (ConfigError, nothing written) a new or empty file when ``default_budget`` is None,
            unless ``unlimited`` (``craft-sdk serve`` fails closed: ``--budget-per-key N`` or ``--no-budget``).
        unlimited: store "no budget" as the default, explicitly (``--no-budget``).

    Example:
        >>> store = SQLiteStore("/var/lib/craft/state.db", default_budget=8000)   # doctest: +SKIP
    """

    def __init__(self, path: str | Path, default_budget: int | None = None, lease_s: float = 10.0, *,
                 timeout_s: float = 30.0, create: bool = True, budget_required: bool = False, unlimited: bool = False) -> None:
        check_budget(default_budget)
        new_store_budget("", default_budget, False, unlimited)
        self.path, self.lease_s = Path(path), lease_s
        if not create and not self.path.is_file():
            raise ConfigError(f"the state database {self.path} does not exist; check --state (craft-sdk serve creates it)")
        created = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                try:
                    os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
                    created = True
                except FileExistsError:  # another process created it just now
                    pass
            self._db = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None, check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            self._open(default_budget, budget_required, unlimited)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"cannot open the state database {self.path}: {exc}; check the path and its permissions") from None
        except ConfigError:
            self._db.close()
            if created:  # refused before anything was written: leave no empty file that a later start would accept
                self.path.unlink(missing_ok=True)
            raise
        _private(self.path)
        self._lock = threading.Lock()
        self._finished = 0

    def _open(self, default_budget: int | None, budget_required: bool, unlimited: bool) -> None:
        """Check (read only) that the file is ours, then switch to WAL, create or upgrade the schema, store the budget."""
        fmt = _format_of(self._db, self.path)  # refuses another application's database before anything is written
        if fmt is None:
            new_store_budget(f"the state {self.path}", default_budget, budget_required, unlimited)
        if fmt is not None and fmt > FORMAT:
            raise ConfigError(f"{self.path} is a state of format {fmt}, written by a newer craft-sdk (this one reads up to {FORMAT}); upgrade craft-sdk")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._tx() as db:
            fmt = _format_of(db, self.path)  # again, inside the write lock: another process may have created it
            for statement in _statements(_SCHEMA) if fmt is None else []:
                db.execute(statement)
            while fmt is not None and fmt < FORMAT:
                for statement in _statements(_MIGRATIONS[fmt]):
                    db.execute(statement)
                fmt += 1
            if default_budget is not None or unlimited:
                db.execute("INSERT OR REPLACE INTO settings VALUES ('default_budget', ?)", (str(default_budget),))
            db.execute("INSERT OR IGNORE INTO settings VALUES ('secret', ?)", (secrets.token_hex(32),))

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
        if row is None:
            raise StoreError(LOST)
        return None if row[0] == "None" else stored_int(row[0], None)

    def _budget(self, db: sqlite3.Connection, key: str) -> tuple[int, int, int | None]:
        row = db.execute("SELECT used, uploads, budget FROM usage WHERE key = ?", (key,)).fetchone()
        used, uploads, own = row if row is not None else (0, 0, None)
        return stored_int(used, key, "used queries"), int(uploads), stored_int(own, key) if own is not None else self._default(db)

    def begin(self, key: str, idem: str | None, request: str, n: int, owner: str) -> Begin:
        with self._lock, self._tx() as db:
            if idem is not None:
                rec = db.execute("SELECT request, status, owner, digest, answer, created FROM idempotency WHERE key = ? AND idem = ?",
                                 (key, idem)).fetchone()
                if rec is not None and rec[5] < time.time() - IDEMPOTENCY_TTL_S:
                    db.execute("DELETE FROM idempotency WHERE key = ? AND idem = ?", (key, idem))
                    rec = None
                if rec is not None:
                    if rec[0] != request:
                        return Begin("mismatch")
                    if rec[1] == "done":
                        return Begin("replay", rec[3], rec[4])
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
                db.execute("INSERT INTO idempotency VALUES (?, ?, ?, 'pending', ?, NULL, ?, NULL)", (key, idem, request, owner, time.time()))
            return Begin("charged")

    def finish(self, key: str, idem: str, digest: str, answer: bytes | None = None, n: int = 0) -> bool:
        with self._lock, self._tx() as db:
            cur = db.execute("UPDATE idempotency SET status = 'done', digest = ?, answer = ? WHERE key = ? AND idem = ? AND status = 'pending'",
                             (digest, answer, key, idem))
            if cur.rowcount == 0 and n > 0 and db.execute("SELECT 1 FROM idempotency WHERE key = ? AND idem = ?", (key, idem)).fetchone() is None:
                # refunded by a failed takeover while this answer was computed: the answer is delivered, so bill it again
                used, _, budget = self._budget(db, key)
                if budget is not None and used + n > budget:
                    return False  # over the budget: not billed, not delivered
                db.execute("INSERT INTO usage (key, used) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET used = used + excluded.used", (key, n))
                db.execute("INSERT INTO idempotency VALUES (?, ?, ?, 'done', '', ?, ?, ?)", (key, idem, digest, digest, time.time(), answer))
            self._finished += 1
            if self._finished % 256 == 0:  # bounded: forget finished records after their TTL
                db.execute("DELETE FROM idempotency WHERE status = 'done' AND created < ?", (time.time() - IDEMPOTENCY_TTL_S,))
            return True

    def abort(self, key: str, idem: str | None, n: int, owner: str | None = None) -> None:
        with self._lock, self._tx() as db:
            if owner is not None and idem is not None and db.execute(
                    "SELECT 1 FROM idempotency WHERE key = ? AND idem = ? AND status = 'pending' AND owner = ?", (key, idem, owner)).fetchone() is None:
                return  # taken over (or finished) by another process: its charge is not ours to refund
            db.execute("UPDATE usage SET used = MAX(0, used - ?) WHERE key = ?", (n, key))
            if idem is not None:
                db.execute("DELETE FROM idempotency WHERE key = ? AND idem = ?", (key, idem))

    def count_upload(self, key: str) -> None:
        with self._lock, self._tx() as db:
            db.execute("INSERT INTO usage (key, uploads) VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET uploads = uploads + 1", (key,))

    def usage(self, key: str) -> dict[str, Any]:
        with self._lock:
            used, uploads, budget = self._budget(self._db, key)
        return report_usage(used, uploads, budget)

    def beat(self, owner: str) -> None:
        with self._lock, self._tx() as db:
            db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?)", (owner, time.time()))
            db.execute("DELETE FROM instances WHERE beat < ?", (time.time() - 100 * self.lease_s,))

    def ping(self) -> None:
        with self._lock, self._tx() as db:  # takes the write lock, as a charge does
            self._default(db)

    def secret(self) -> bytes:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE name = 'secret'").fetchone()
        if row is None:
            raise StoreError(LOST)
        return bytes.fromhex(row[0])

    def keys(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT key FROM usage ORDER BY key")]

    def top_up(self, key: str, n: int) -> None:
        with self._lock, self._tx() as db:
            budget = check_top_up(key, self._budget(db, key)[2], n)
            db.execute("INSERT INTO usage (key, budget) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET budget = excluded.budget", (key, budget))

    def set_budget(self, key: str, budget: int | None) -> None:
        check_budget(budget)
        with self._lock, self._tx() as db:
            db.execute("INSERT INTO usage (key, budget) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET budget = excluded.budget", (key, budget))

    def reset(self, key: str) -> None:
        with self._lock, self._tx() as db:
            db.execute("INSERT INTO usage (key) VALUES (?) ON CONFLICT(key) DO UPDATE SET used = 0", (key,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(spec: str | Path | None, default_budget: int | None = None, lease_s: float = 10.0, *,
               timeout_s: float = 30.0, create: bool = True, budget_required: bool = False, unlimited: bool = False) -> Store:
    """The store named by ``spec``: None or ``"memory"``, a SQLite file path, or ``redis://host:port/db``.

    ``default_budget`` None keeps a persistent store's stored default (a restart without
    ``--budget-per-key`` does not erase it); ``create`` False refuses a store that does not exist yet;
    ``budget_required`` refuses a persistent store that holds no meters (new, flushed, deleted) when
    ``default_budget`` is None, unless ``unlimited`` (stored explicitly: no budget).

    Example:
        >>> open_store("memory", default_budget=100).usage("alice")["remaining"]
        100
    """
    if spec is None or str(spec) == "memory":
        new_store_budget("", default_budget, False, unlimited)
        return MemoryStore(default_budget, lease_s)
    text = str(spec)
    if text.startswith(("redis://", "rediss://", "unix://")):
        from .redis_store import RedisStore

        return RedisStore(text, default_budget, lease_s, timeout_s=timeout_s, create=create, budget_required=budget_required, unlimited=unlimited)
    return SQLiteStore(text, default_budget, lease_s, timeout_s=timeout_s, create=create, budget_required=budget_required, unlimited=unlimited)
