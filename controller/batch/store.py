"""Durable batch state: jobs, items and results in SQLite at ``<data_dir>/batch/batch.sqlite``.

Why it cannot lose or double a result: an item's result and its state change are one
transaction, ``UPDATE items SET state='done', result=... WHERE ... AND state='pending'``,
together with the job's counters. WAL with ``synchronous=FULL`` makes each commit durable
before ``record`` returns. A second completion of the same item (a re-run after a crash, a
late reply after expiry or cancellation) finds the item no longer pending and changes
nothing; the (job, custom_id) primary key allows one row, so one result, per item.

Nothing here is in etcd: the controller's data directory holds it all.

Tables (schema version 1)::

    jobs         id, tenant, state, created_ms, window_s, expires_ms, finished_ms, filename,
                 n_total, n_pending, n_done, n_error, n_expired, n_cancelled, n_rejected
    items        (job, custom_id) PK, line, seq (run order), url, request JSON,
                 state pending|done|error|expired|cancelled, result JSON, error_code,
                 error_message, attempts, updated_ms
    line_errors  (job, line) PK, custom_id, code, message  -- lines refused at submission

``ResultStore`` is the seam for moving results elsewhere later (an object store, another
database): the runner writes through ``record`` and the service reads through ``results`` /
``errors`` only. A replacement must keep ``record``'s contract: atomic with the item's state,
conditional on the item being pending, durable on return.

Every method is synchronous and serialised by one lock (one connection); async callers run
them in a thread (``asyncio.to_thread``) so a disk sync never blocks the event loop.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from kvfleet.controller.batch.parse import ItemSpec, LineError

JobState = Literal["validating", "in_progress", "cancelling", "cancelled", "completed", "expired", "failed"]
ItemState = Literal["pending", "done", "error", "expired", "cancelled"]
ACTIVE_STATES = ("in_progress", "cancelling")
FINISHED_STATES = ("cancelled", "completed", "expired", "failed")
SCHEMA_VERSION = 1
CANCELLED_MESSAGE = "the job was cancelled before this item ran"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, state TEXT NOT NULL,
    created_ms INTEGER NOT NULL, window_s INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
    finished_ms INTEGER NOT NULL DEFAULT 0, filename TEXT NOT NULL DEFAULT '',
    n_total INTEGER NOT NULL, n_pending INTEGER NOT NULL, n_done INTEGER NOT NULL DEFAULT 0,
    n_error INTEGER NOT NULL DEFAULT 0, n_expired INTEGER NOT NULL DEFAULT 0,
    n_cancelled INTEGER NOT NULL DEFAULT 0, n_rejected INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_ms);
CREATE TABLE IF NOT EXISTS items (
    job TEXT NOT NULL, custom_id TEXT NOT NULL, line INTEGER NOT NULL, seq INTEGER NOT NULL,
    url TEXT NOT NULL, request TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
    result TEXT, error_code TEXT, error_message TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, updated_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job, custom_id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS items_line ON items(job, line);
CREATE INDEX IF NOT EXISTS items_pending ON items(job, seq) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS line_errors (
    job TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL, code TEXT NOT NULL,
    message TEXT NOT NULL, PRIMARY KEY (job, line)
) WITHOUT ROWID;
"""


class JobNotFound(KeyError):
    pass


class JobFinished(Exception):
    """The job is already cancelled, completed, expired or failed."""


@dataclass(frozen=True, slots=True)
class JobCounts:
    total: int       # accepted items
    pending: int     # queued or in flight
    done: int
    error: int
    expired: int
    cancelled: int
    rejected: int    # lines refused at submission


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    tenant: str
    state: JobState
    created_ms: int        # Unix ms
    window_s: int          # completion window, seconds
    expires_ms: int        # Unix ms: created_ms + window_s * 1000
    finished_ms: int       # Unix ms; 0 while active
    filename: str
    counts: JobCounts

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


@dataclass(frozen=True, slots=True)
class PendingItem:
    job_id: str
    custom_id: str
    line: int
    seq: int               # position in the job's run order
    url: str
    request: dict          # normalised body (parse.ItemSpec.request)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one item ended. ``state`` "done" carries ``result``; "error" carries code and message."""

    job_id: str
    custom_id: str
    state: Literal["done", "error"]
    result: dict | None = None
    error_code: str = ""
    error_message: str = ""
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class ResultRow:
    custom_id: str
    line: int
    url: str
    result: dict
    attempts: int
    completed_ms: int


@dataclass(frozen=True, slots=True)
class ErrorRow:
    line: int
    custom_id: str
    code: str
    message: str


class ResultStore(Protocol):
    """Where item outcomes are recorded and read back (the pluggable part)."""

    def record(self, outcomes: Sequence[Outcome], now_ms: int | None = None) -> list[bool]:
        """Records each outcome iff its item is still pending; True where it was recorded."""
        ...

    def results(self, job_id: str, after_line: int = 0, limit: int = 1000) -> list[ResultRow]:
        """Completed items with line > ``after_line``, in line order."""
        ...

    def errors(self, job_id: str, after_line: int = 0, limit: int = 1000) -> list[ErrorRow]:
        """Rejected lines and failed/expired/cancelled items with line > ``after_line``, in line order."""
        ...


def _now_ms() -> int:
    return int(time.time() * 1000)


class BatchStore:
    """The SQLite implementation of job state and of ``ResultStore``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")   # a commit is on disk when it returns
        self._db.execute("PRAGMA busy_timeout=5000")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(f"{path}: batch store schema {version} is newer than this kvfleet ({SCHEMA_VERSION})")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> "BatchStore":
        return cls(Path(data_dir) / "batch" / "batch.sqlite")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- jobs ------------------------------------------------------------------------------
    def create_job(self, job_id: str, tenant: str, window_s: int, items: Sequence[ItemSpec],
                   errors: Sequence[LineError], filename: str = "", now_ms: int | None = None) -> Job:
        """Writes the job, its items (``items`` in run order) and its line errors at once.
        A job with no valid line is ``failed`` from the start."""
        now = _now_ms() if now_ms is None else now_ms
        state = "in_progress" if items else "failed"
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, tenant, state, created_ms, window_s, expires_ms, finished_ms, filename,"
                " n_total, n_pending, n_rejected) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (job_id, tenant, state, now, window_s, now + window_s * 1000, 0 if items else now, filename,
                 len(items), len(items), len(errors)))
            db.executemany(
                "INSERT INTO items (job, custom_id, line, seq, url, request, updated_ms) VALUES (?,?,?,?,?,?,?)",
                ((job_id, it.custom_id, it.line, seq, it.url, json.dumps(it.request, separators=(",", ":")), now)
                 for seq, it in enumerate(items)))
            db.executemany("INSERT INTO line_errors (job, line, custom_id, code, message) VALUES (?,?,?,?,?)",
                           ((job_id, e.line, e.custom_id, e.code, e.message) for e in errors))
        return self.get_job(job_id)  # type: ignore[return-value]

    def get_job(self, job_id: str) -> Job | None:
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list_jobs(self, tenant: str | None = None, limit: int = 100) -> list[Job]:
        """Newest first; ``tenant`` None: every tenant."""
        if tenant is None:
            rows = self._read("SELECT * FROM jobs ORDER BY created_ms DESC, id LIMIT ?", (limit,))
        else:
            rows = self._read("SELECT * FROM jobs WHERE tenant = ? ORDER BY created_ms DESC, id LIMIT ?", (tenant, limit))
        return [_job(r) for r in rows]

    def active_jobs(self) -> list[Job]:
        """Jobs the runner works on, oldest first (first come, first served)."""
        rows = self._read("SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY created_ms, id", ACTIVE_STATES)
        return [_job(r) for r in rows]

    def pending_items(self, job_id: str, limit: int, models: Collection[str] | None = None) -> list[PendingItem]:
        """The job's first ``limit`` pending items in run order (includes any in flight);
        ``models``: only items for these models (None: any)."""
        where = ""
        args: tuple = (job_id,)
        if models is not None:
            where = f" AND json_extract(request, '$.model') IN ({','.join('?' * len(models))})"
            args += tuple(models)
        rows = self._read("SELECT custom_id, line, seq, url, request FROM items WHERE job = ? AND state = 'pending'"
                          f"{where} ORDER BY seq LIMIT ?", (*args, limit))
        return [PendingItem(job_id, r["custom_id"], r["line"], r["seq"], r["url"], json.loads(r["request"])) for r in rows]

    def request_cancel(self, job_id: str, now_ms: int | None = None) -> Job:  # noqa: ARG002
        """in_progress -> cancelling (the runner then cancels what is not in flight).
        Idempotent while cancelling; JobFinished once the job has ended."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            if row["state"] in FINISHED_STATES:
                raise JobFinished(f"job {job_id} is already {row['state']}")
            db.execute("UPDATE jobs SET state = 'cancelling' WHERE id = ?", (job_id,))
        return self.get_job(job_id)  # type: ignore[return-value]

    def cancel_pending(self, job_id: str, keep: Collection[str] = (), now_ms: int | None = None) -> int:
        """Pending items not in ``keep`` (the ones in flight) become cancelled; returns how many."""
        now = _now_ms() if now_ms is None else now_ms
        with self._tx() as db:
            return _end_pending(db, job_id, "cancelled", CANCELLED_MESSAGE, keep, now)

    def expire_job(self, job_id: str, now_ms: int | None = None) -> int:
        """The window has ended: every pending item becomes expired and the job ``expired``, in
        one transaction (a reply still in flight then finds its item no longer pending and is
        dropped). Returns how many items expired."""
        now = _now_ms() if now_ms is None else now_ms
        with self._tx() as db:
            row = db.execute("SELECT state, window_s FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] not in ACTIVE_STATES:
                return 0
            n = _end_pending(db, job_id, "expired",
                             f"not finished within the job's completion window ({row['window_s']} s)", (), now)
            db.execute("UPDATE jobs SET state = 'expired', finished_ms = ? WHERE id = ?", (now, job_id))
        return n

    def settle(self, job_id: str, now_ms: int | None = None) -> Job | None:
        """Ends an active job whose items are all finished: in_progress -> completed;
        cancelling -> cancelled (call it once nothing of the job is in flight: the remaining
        pending items become cancelled). Returns the job as it is now."""
        now = _now_ms() if now_ms is None else now_ms
        with self._tx() as db:
            row = db.execute("SELECT state, n_pending FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and row["state"] == "cancelling":
                _end_pending(db, job_id, "cancelled", CANCELLED_MESSAGE, (), now)
                db.execute("UPDATE jobs SET state = 'cancelled', finished_ms = ? WHERE id = ?", (now, job_id))
            elif row is not None and row["state"] == "in_progress" and row["n_pending"] == 0:
                db.execute("UPDATE jobs SET state = 'completed', finished_ms = ? WHERE id = ?", (now, job_id))
        return self.get_job(job_id)

    # -- ResultStore -------------------------------------------------------------------------
    def record(self, outcomes: Sequence[Outcome], now_ms: int | None = None) -> list[bool]:
        """One transaction for all ``outcomes`` (group commit: one disk sync for many items);
        each is applied only if its item is still pending."""
        now = _now_ms() if now_ms is None else now_ms
        applied = []
        with self._tx() as db:
            for o in outcomes:
                cur = db.execute(
                    "UPDATE items SET state = ?, result = ?, error_code = ?, error_message = ?, attempts = ?,"
                    " updated_ms = ? WHERE job = ? AND custom_id = ? AND state = 'pending'",
                    (o.state, json.dumps(o.result, separators=(",", ":")) if o.result is not None else None,
                     o.error_code or None, o.error_message or None, o.attempts, now, o.job_id, o.custom_id))
                ok = cur.rowcount == 1
                if ok:
                    col = "n_done" if o.state == "done" else "n_error"
                    db.execute(f"UPDATE jobs SET n_pending = n_pending - 1, {col} = {col} + 1 WHERE id = ?", (o.job_id,))
                applied.append(ok)
        return applied

    def results(self, job_id: str, after_line: int = 0, limit: int = 1000) -> list[ResultRow]:
        rows = self._read("SELECT custom_id, line, url, result, attempts, updated_ms FROM items"
                          " WHERE job = ? AND line > ? AND state = 'done' ORDER BY line LIMIT ?",
                          (job_id, after_line, limit))
        return [ResultRow(r["custom_id"], r["line"], r["url"], json.loads(r["result"]), r["attempts"], r["updated_ms"])
                for r in rows]

    def errors(self, job_id: str, after_line: int = 0, limit: int = 1000) -> list[ErrorRow]:
        rows = self._read(
            "SELECT line, custom_id, code, message FROM line_errors WHERE job = ? AND line > ?"
            " UNION ALL SELECT line, custom_id, error_code, error_message FROM items"
            " WHERE job = ? AND line > ? AND state IN ('error', 'expired', 'cancelled') ORDER BY line LIMIT ?",
            (job_id, after_line, job_id, after_line, limit))
        return [ErrorRow(r[0], r[1], r[2], r[3]) for r in rows]

    def item_states(self, job_id: str) -> dict[str, str]:
        """custom_id -> state, for checks and tests (reads every item of the job)."""
        return {r[0]: r[1] for r in self._read("SELECT custom_id, state FROM items WHERE job = ?", (job_id,))}


def _end_pending(db: sqlite3.Connection, job_id: str, state: ItemState, message: str,
                 keep: Collection[str], now_ms: int) -> int:
    """Inside a transaction: the job's pending items (but ``keep``) end in ``state``."""
    keep = list(keep)
    # keep is small (the runner's in-flight window), so a NOT IN list is fine.
    marks = ",".join("?" * len(keep))
    cur = db.execute(
        f"UPDATE items SET state = ?, error_code = ?, error_message = ?, updated_ms = ?"
        f" WHERE job = ? AND state = 'pending'{f' AND custom_id NOT IN ({marks})' if keep else ''}",
        (state, state, message, now_ms, job_id, *keep))
    n = cur.rowcount
    if n:
        db.execute(f"UPDATE jobs SET n_pending = n_pending - ?, n_{state} = n_{state} + ? WHERE id = ?", (n, n, job_id))
    return n


def _job(r: sqlite3.Row) -> Job:
    return Job(
        id=r["id"], tenant=r["tenant"], state=r["state"], created_ms=r["created_ms"], window_s=r["window_s"],
        expires_ms=r["expires_ms"], finished_ms=r["finished_ms"], filename=r["filename"],
        counts=JobCounts(total=r["n_total"], pending=r["n_pending"], done=r["n_done"], error=r["n_error"],
                         expired=r["n_expired"], cancelled=r["n_cancelled"], rejected=r["n_rejected"]),
    )
