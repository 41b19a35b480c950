"""reviews.sqlite: append-only log + current state, undo/redo, concurrent writers, restarts."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading

import numpy as np
import pytest

from datainf_core.errors import DataInfError
from datainf_core.review import ACTIONS, ReviewError, ReviewStore


@pytest.fixture
def store(tmp_path):
    return ReviewStore(tmp_path / "reviews.sqlite")


def _state(store: ReviewStore) -> dict[int, tuple]:
    cur = store.current()
    return {int(r.train_index): (r.action, r.corrected_label, r.note) for r in cur.itertuples()}


def test_record_sets_current_state_and_logs(store):
    store.record(3, "relabel", corrected_label="positive", note="obvious")
    store.record([1, 2], "exclude")
    assert _state(store) == {
        1: ("exclude", None, ""),
        2: ("exclude", None, ""),
        3: ("relabel", "positive", "obvious"),
    }
    log = store.log()
    assert list(log["kind"]) == ["decide"] * 3
    assert list(log["train_index"]) == [3, 1, 2]
    assert store.counts() == {
        "keep": 0,
        "relabel": 1,
        "exclude": 2,
        "needs_review": 0,
        "reviewed": 3,
    }
    assert store.decision(3)["corrected_label"] == "positive"
    assert store.decision(99) is None
    lean = store.actions()
    assert list(lean.columns) == ["train_index", "action", "corrected_label"]
    assert lean.equals(store.current()[list(lean.columns)])


def test_wal_mode_and_busy_timeout(store):
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_overwrite_keeps_previous_state_in_log(store):
    store.record(5, "keep")
    store.record(5, "relabel", corrected_label="b")
    log = store.log()
    assert log.iloc[-1]["prev_action"] == "keep"
    assert _state(store)[5] == ("relabel", "b", "")


def test_undo_redo_single_and_bulk(store):
    store.record(0, "keep")
    store.record([1, 2, 3], "exclude")  # one bulk batch
    store.record(0, "relabel", corrected_label="x")
    assert store.undo() is not None  # reverts the relabel: 0 back to keep
    assert _state(store)[0] == ("keep", None, "")
    store.undo()  # reverts the whole bulk exclude at once
    assert set(_state(store)) == {0}
    assert store.can_redo()
    store.redo()
    assert set(_state(store)) == {0, 1, 2, 3}
    store.redo()
    assert _state(store)[0] == ("relabel", "x", "")
    assert store.redo() is None
    # The log only grows: 5 decisions, 4 undo rows, 4 redo rows.
    kinds = store.log()["kind"].value_counts().to_dict()
    assert kinds == {"decide": 5, "undo": 4, "redo": 4}


def test_new_decision_empties_redo_stack(store):
    store.record(0, "keep")
    store.record(1, "exclude")
    store.undo()
    assert store.can_redo()
    store.record(2, "needs_review")
    assert not store.can_redo()
    assert store.redo() is None
    # Undo now reverts the new decision, then the first one; then nothing is left.
    store.undo()
    store.undo()
    assert _state(store) == {}
    assert store.undo() is None
    assert not store.can_undo()
    # Redo walks back in the order the undos happened (most recent first).
    store.redo()
    assert _state(store) == {0: ("keep", None, "")}
    store.redo()
    assert _state(store) == {0: ("keep", None, ""), 2: ("needs_review", None, "")}
    assert store.redo() is None


def test_random_sequence_matches_reference(tmp_path):
    rng = np.random.default_rng(0)
    store = ReviewStore(tmp_path / "r.sqlite")
    history: list[dict] = [{}]  # reference: a stack of full states
    pos = 0
    for _ in range(120):
        op = rng.choice(["record", "record", "undo", "redo"])
        if op == "record":
            idx = [int(i) for i in rng.choice(8, size=int(rng.integers(1, 4)), replace=False)]
            action = str(rng.choice(ACTIONS))
            label = "L" + str(int(rng.integers(3))) if action == "relabel" else None
            store.record(idx, action, corrected_label=label)
            state = dict(history[pos])
            for i in idx:
                state[i] = (action, label, "")
            history = history[: pos + 1] + [state]
            pos += 1
        elif op == "undo":
            done = store.undo()
            assert (done is None) == (pos == 0)
            pos = max(pos - 1, 0)
        else:
            done = store.redo()
            assert (done is None) == (pos == len(history) - 1)
            pos = min(pos + 1, len(history) - 1)
        assert _state(store) == history[pos]


def test_restart_keeps_state_and_stacks(tmp_path):
    path = tmp_path / "reviews.sqlite"
    first = ReviewStore(path)
    first.record(4, "relabel", corrected_label="neg")
    first.record(7, "exclude")
    first.undo()
    del first
    again = ReviewStore(path)
    assert _state(again) == {4: ("relabel", "neg", "")}
    assert again.can_redo()
    again.redo()
    assert _state(again)[7] == ("exclude", None, "")


@pytest.mark.parametrize(
    ("index", "action", "label", "match"),
    [
        (0, "delete", None, "unknown review action 'delete'"),
        (0, "relabel", None, "needs a corrected_label"),
        (0, "relabel", "  ", "needs a corrected_label"),
        (0, "keep", "pos", "only goes with action 'relabel'"),
        ([], "keep", None, "no training samples selected"),
        (-1, "keep", None, "not a row number"),
        ("12", "keep", None, "is text"),
        ([1.5], "keep", None, "not a row number"),
        (["a"], "keep", None, "not an integer"),
    ],
)
def test_bad_input_raises_one_line_error(store, index, action, label, match):
    with pytest.raises(ReviewError, match=match) as info:
        store.record(index, action, corrected_label=label)
    assert isinstance(info.value, DataInfError)
    assert "\n" not in str(info.value)
    assert store.log().empty


def test_numpy_indices_and_duplicates(store):
    store.record(np.array([2, 2, 5]), "keep")
    store.record(np.int64(9), "exclude")
    assert sorted(_state(store)) == [2, 5, 9]
    assert len(store.log()) == 3


def test_folder_path_refused(tmp_path):
    with pytest.raises(ReviewError, match="is a folder"):
        ReviewStore(tmp_path)


def test_two_threads_write_at_once(tmp_path):
    path = tmp_path / "reviews.sqlite"
    ReviewStore(path)
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            store = ReviewStore(path)
            for i in range(60):
                store.record(offset + i, "exclude" if i % 2 else "keep")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k * 1000,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = ReviewStore(path)
    assert store.counts()["reviewed"] == 120
    assert len(store.log()) == 120


def _process_writer(path: str, offset: int, n: int) -> None:
    store = ReviewStore(path)
    for i in range(n):
        store.record([offset + i, offset + i + 500], "needs_review")


def test_two_processes_write_at_once(tmp_path):
    path = str(tmp_path / "reviews.sqlite")
    ReviewStore(path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_process_writer, args=(path, k * 10_000, 40)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    store = ReviewStore(path)
    assert store.counts()["needs_review"] == 160
    log = store.log()
    assert len(log) == 160
    assert log["event_id"].is_monotonic_increasing
    # Each batch's events are contiguous: transactions never interleave.
    for _, group in log.groupby("batch_id"):
        ids = group["event_id"].to_numpy()
        assert (np.diff(ids) == 1).all()


def test_failed_write_leaves_nothing(store, monkeypatch):
    store.record(1, "keep")

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ReviewStore, "_append_events", staticmethod(boom))
    with pytest.raises(OSError):
        store.record(2, "exclude")
    monkeypatch.undo()
    assert _state(store) == {1: ("keep", None, "")}
    assert len(store.log()) == 1
    assert store.undo() is not None  # the failed batch left no stack entry behind
    assert _state(store) == {}


def test_bulk_of_many_is_fast(store):
    import time

    start = time.perf_counter()
    store.record(range(20_000), "exclude")
    store.undo()
    store.redo()
    assert time.perf_counter() - start < 5.0
    assert store.counts()["exclude"] == 20_000
