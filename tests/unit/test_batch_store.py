"""The batch store: exactly-once recording, counts, expiry and cancellation, surviving a reopen."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from kvfleet.controller.batch.parse import CHAT_URL, parse_batch
from kvfleet.controller.batch.store import BatchStore, JobFinished, JobNotFound, Outcome

T0 = 1_700_000_000_000


def _file(n: int, bad: int = 0) -> bytes:
    lines = [json.dumps({"custom_id": f"c{i}", "url": CHAT_URL, "body": {
        "model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": f"q{i:04d}"}]}}) for i in range(n)]
    lines += ["{oops"] * bad
    return "\n".join(lines).encode()


def _job(store: BatchStore, n: int = 5, bad: int = 0, job_id: str = "j1", window_s: int = 60):
    p = parse_batch(_file(n, bad), {"m"})
    return store.create_job(job_id, "acme", window_s, p.items, p.errors, "f.jsonl", now_ms=T0)


def done(cid: str, job: str = "j1", text: str = "out") -> Outcome:
    return Outcome(job, cid, "done", result={"text": text, "prompt_tokens": 3}, attempts=1)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "batch" / "batch.sqlite"


def test_create_job_writes_items_in_run_order_and_line_errors(path):
    store = BatchStore(path)
    job = _job(store, 3, bad=2)
    assert (job.state, job.tenant, job.expires_ms, job.filename) == ("in_progress", "acme", T0 + 60_000, "f.jsonl")
    assert (job.counts.total, job.counts.pending, job.counts.rejected) == (3, 3, 2)
    assert [(i.custom_id, i.seq) for i in store.pending_items("j1", 10)] == [("c0", 0), ("c1", 1), ("c2", 2)]
    assert [(e.line, e.code) for e in store.errors("j1")] == [(4, "invalid_json"), (5, "invalid_json")]


def test_a_job_with_no_valid_line_has_failed(path):
    store = BatchStore(path)
    p = parse_batch(b"{bad\n{worse", {"m"})
    job = store.create_job("j", "t", 60, p.items, p.errors, now_ms=T0)
    assert job.state == "failed" and job.finished_ms == T0 and job.counts.rejected == 2


def test_an_item_is_recorded_once_even_when_completed_twice(path):
    store = BatchStore(path)
    _job(store, 2)
    assert store.record([done("c0", text="first")]) == [True]
    assert store.record([done("c0", text="second"), done("c1")]) == [False, True]
    rows = store.results("j1")
    assert [(r.custom_id, r.result["text"]) for r in rows] == [("c0", "first"), ("c1", "out")]
    c = store.get_job("j1").counts
    assert (c.pending, c.done) == (0, 2)


def test_results_survive_a_reopen_and_in_flight_items_are_pending_again(path):
    store = BatchStore(path)
    _job(store, 4)
    store.record([done("c0"), Outcome("j1", "c1", "error", error_code="invalid_argument", error_message="too long")])
    # c2 was "in flight" (the runner holds it only in memory) when the process died.
    store._db.close()  # no orderly close: what is committed must be all there is
    again = BatchStore(path)
    job = again.get_job("j1")
    assert (job.state, job.counts.pending, job.counts.done, job.counts.error) == ("in_progress", 2, 1, 1)
    assert [i.custom_id for i in again.pending_items("j1", 10)] == ["c2", "c3"]
    assert [r.custom_id for r in again.results("j1")] == ["c0"]
    assert [(e.custom_id, e.code) for e in again.errors("j1")] == [("c1", "invalid_argument")]
    # The re-run of c0 after the restart changes nothing.
    assert again.record([done("c0", text="rerun"), done("c2"), done("c3")]) == [False, True, True]
    assert again.settle("j1", now_ms=T0 + 5).state == "completed"
    assert again.get_job("j1").finished_ms == T0 + 5


def test_concurrent_recorders_of_one_item_record_exactly_one(path):
    store = BatchStore(path)
    _job(store, 1)
    wins = []

    def rec(i: int) -> None:
        wins.extend(store.record([done("c0", text=f"w{i}")]))

    threads = [threading.Thread(target=rec, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1 and len(wins) == 8
    assert store.get_job("j1").counts.done == 1 and len(store.results("j1")) == 1


def test_expiry_marks_every_pending_item_and_drops_late_replies(path):
    store = BatchStore(path)
    _job(store, 3)
    store.record([done("c0")])
    assert store.expire_job("j1", now_ms=T0 + 61_000) == 2
    job = store.get_job("j1")
    assert (job.state, job.counts.expired, job.counts.pending, job.finished_ms) == ("expired", 2, 0, T0 + 61_000)
    assert store.record([done("c1")]) == [False]   # a reply that arrives after the window
    assert [(e.custom_id, e.code) for e in store.errors("j1")] == [("c1", "expired"), ("c2", "expired")]
    assert store.expire_job("j1") == 0   # idempotent


def test_cancel_keeps_in_flight_items_until_they_land_then_settles(path):
    store = BatchStore(path)
    _job(store, 4)
    assert store.request_cancel("j1").state == "cancelling"
    assert store.cancel_pending("j1", keep=["c1"]) == 3
    assert store.record([done("c1")]) == [True]      # the in-flight one finishes
    job = store.settle("j1", now_ms=T0 + 9)
    assert (job.state, job.counts.done, job.counts.cancelled, job.counts.pending) == ("cancelled", 1, 3, 0)
    with pytest.raises(JobFinished):
        store.request_cancel("j1")
    with pytest.raises(JobNotFound):
        store.request_cancel("nope")


def test_cancelling_job_reopened_settles_with_nothing_in_flight(path):
    store = BatchStore(path)
    _job(store, 2)
    store.request_cancel("j1")
    store.close()
    again = BatchStore(path)
    job = again.settle("j1")
    assert (job.state, job.counts.cancelled) == ("cancelled", 2)


def test_settle_leaves_a_job_with_pending_items_alone(path):
    store = BatchStore(path)
    _job(store, 2)
    store.record([done("c0")])
    assert store.settle("j1").state == "in_progress"


def test_list_jobs_newest_first_and_by_tenant(path):
    store = BatchStore(path)
    p = parse_batch(_file(1), {"m"})
    for i, tenant in enumerate(["a", "b", "a"]):
        store.create_job(f"j{i}", tenant, 60, p.items, p.errors, now_ms=T0 + i)
    assert [j.id for j in store.list_jobs()] == ["j2", "j1", "j0"]
    assert [j.id for j in store.list_jobs("a")] == ["j2", "j0"]
    assert [j.id for j in store.active_jobs()] == ["j0", "j1", "j2"]


def test_store_is_wal_with_full_sync(path):
    store = BatchStore(path)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2   # FULL
    store.close()
    db = sqlite3.connect(path)
    assert {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")} >= {"jobs", "items", "line_errors"}


def test_results_and_errors_page_in_line_order(path):
    store = BatchStore(path)
    _job(store, 7)
    store.record([done(f"c{i}") for i in range(7) if i != 3])
    store.record([Outcome("j1", "c3", "error", error_code="invalid_argument", error_message="x")])
    lines = []
    after = 0
    while rows := store.results("j1", after, 2):
        lines += [r.line for r in rows]
        after = rows[-1].line
    assert lines == [1, 2, 3, 5, 6, 7]
    assert [e.line for e in store.errors("j1")] == [4]
