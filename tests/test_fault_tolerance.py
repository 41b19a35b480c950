"""Fault tolerance: ``kill -9`` mid-stage loses nothing, writes are atomic, two reviewers at once.

The kill tests run a real worker subprocess (``datainf run`` / ``datainf train`` through
``datainf_core.cli.main``, or a review loop). To kill it reliably *inside* a stage on a loaded
2-core machine, the worker script parks itself at a chosen point of that stage (after it has
written a marker file) instead of racing a timer; then the test sends SIGKILL. Nothing in the
worker can clean up after SIGKILL, so whatever is on disk is what a crash leaves.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from fixtures import make_tiny_classification_project
from tolerances import ENGINE_ATOL, ENGINE_RTOL

from datainf_core import runs
from datainf_core.project import load_project
from datainf_core.review import ReviewStore

REPO = Path(__file__).resolve().parent.parent
SETTINGS = runs.RunSettings(methods=["datainf"], per_query=False)
WAIT_S = 240

# The worker: patches one hook to park at a marker, then runs the CLI (or a review loop).
WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    stage, marker, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]

    def park():
        marker.write_text(str(os.getpid()))
        time.sleep(3600)

    if stage == "gradients":
        # Small shards, so one is on disk before the worker parks inside the next one.
        import datainf_core.gradients as gradients
        import datainf_core.store as store

        store.collect_gradients_to_store.__kwdefaults__["shard_size"] = 8
        real_collect = gradients.collect_gradients_and_losses
        calls = []

        def collect(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                park()
            return real_collect(*args, **kwargs)

        gradients.collect_gradients_and_losses = collect
    elif stage == "scoring":
        import datainf_core.runs as runs

        def compute(*args, **kwargs):
            park()

        runs._compute_method = compute
    elif stage == "training":
        import datainf_core.train as train

        real_fit = train.fit_lora

        def fit(*args, progress=None, **kwargs):
            def step(done, total, *rest):
                if done >= 2:
                    park()

            return real_fit(*args, progress=step, **kwargs)

        train.fit_lora = fit
    elif stage == "review":
        from datainf_core.review import ReviewStore

        store = ReviewStore(argv[0])
        for i in range(100000):
            if i == 40:  # one big batch: it must land whole or not at all
                marker.write_text("bulk")
                store.record(list(range(1000, 60000)), "needs_review")
                print("bulk", flush=True)
                continue
            store.record(i, "exclude" if i % 2 else "keep", note=f"n{i}")
            print(i, flush=True)
        raise SystemExit(0)

    from datainf_core.cli import main

    raise SystemExit(main(argv))
    """
)


def _spawn(tmp_path: Path, stage: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    marker = tmp_path / f"{stage}.marker"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, str(script), stage, str(marker), *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, marker


def _wait_for(marker: Path, process: subprocess.Popen) -> None:
    deadline = time.time() + WAIT_S
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"worker ended before the stage: {process.stderr.read()}")
        assert time.time() < deadline, "the worker never reached the stage"
        time.sleep(0.05)


def _kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def _assert_no_partial_files(folder: Path) -> None:
    """Every JSON parses, every Parquet reads, no temporary file is left next to a result."""
    for path in folder.rglob("*"):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".parquet":
            pd.read_parquet(path)
    leftovers = [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Scores of an uninterrupted run on a fresh copy of the tiny project."""
    project = make_tiny_classification_project(
        tmp_path_factory.mktemp("reference"), n_train=40, n_validation=8, noise=0.2
    )
    folder = runs.execute_run(project, SETTINGS)
    return runs.load_signals(project, folder.name)


def _same_signals(got: pd.DataFrame, want: pd.DataFrame) -> None:
    for column in ("datainf", "self_influence", "train_loss", "combined"):
        pd.testing.assert_series_equal(
            got[column], want[column], rtol=ENGINE_RTOL, atol=ENGINE_ATOL, check_names=False
        )


# ---- kill -9 mid-stage --------------------------------------------------------------------------


def test_kill_during_gradient_collection_resumes(tmp_path, reference, monkeypatch):
    from datainf_core import store

    monkeypatch.setitem(store.collect_gradients_to_store.__kwdefaults__, "shard_size", 8)
    project = make_tiny_classification_project(tmp_path, n_train=40, n_validation=8, noise=0.2)
    run_id = runs.new_run_id()
    argv = ["run", str(project.root), "--run-id", run_id, "--no-progress"]
    process, marker = _spawn(tmp_path, "gradients", argv)
    _wait_for(marker, process)
    status = runs.read_status(project, run_id)
    # status.json is rewritten at most every 0.5 s, so ``done`` may still read 0 here.
    assert status["stage"] == "train gradients" and status["done"] < status["total"], status
    _kill(process)
    # The crash is visible as a failed run, and the first shard survived it.
    assert runs.read_status(project, run_id)["state"] == "failed"
    manifest = json.loads(next(project.gradients_dir.glob("train/*/manifest.json")).read_text())
    assert [shard["index"] for shard in manifest["shards"]] == [0]
    first_shard = next(project.gradients_dir.glob("train/*/shard-00000.safetensors"))
    written = first_shard.stat().st_mtime_ns
    _assert_no_partial_files(project.root)
    # Rerunning the same run id resumes after the kept shard and gives the uninterrupted scores.
    runs.execute_run(project, SETTINGS, run_id=run_id)
    assert first_shard.stat().st_mtime_ns == written
    assert runs.read_status(project, run_id)["state"] == "done"
    _same_signals(runs.load_signals(project, run_id), reference)


def test_kill_during_scoring_keeps_gradients(tmp_path, reference):
    project = make_tiny_classification_project(tmp_path, n_train=40, n_validation=8, noise=0.2)
    run_id = runs.new_run_id()
    argv = ["run", str(project.root), "--run-id", run_id, "--no-progress"]
    process, marker = _spawn(tmp_path, "scoring", argv)
    _wait_for(marker, process)
    assert runs.read_status(project, run_id)["stage"] == "scores: datainf"
    _kill(process)
    folder = runs.run_dir(project, run_id)
    assert not (folder / "scores.parquet").exists()
    _assert_no_partial_files(project.root)
    stores = list(project.gradients_dir.glob("*/*/manifest.json"))
    assert stores and all(json.loads(p.read_text())["complete"] for p in stores)
    # A new run reuses the complete gradient stores and gives the uninterrupted scores.
    again = runs.execute_run(project, SETTINGS)
    _same_signals(runs.load_signals(project, again.name), reference)
    assert runs.latest_run(project) == again.name  # the killed run is not offered as finished


def test_kill_during_fine_tuning_leaves_project_intact(tmp_path, reference):
    project = make_tiny_classification_project(tmp_path, n_train=40, n_validation=8, noise=0.2)
    toml_before = project.project_file.read_bytes()
    adapter = project.adapter_path
    adapter_before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    argv = ["train", str(project.root), "--epochs", "2", "--batch-size", "4", "--no-progress"]
    process, marker = _spawn(tmp_path, "training", argv)
    _wait_for(marker, process)
    _kill(process)
    # Nothing the project points at changed: same project.toml, same adapter, same scores.
    assert project.project_file.read_bytes() == toml_before
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == adapter_before
    project = load_project(project.root)
    folder = runs.execute_run(project, SETTINGS)
    _same_signals(runs.load_signals(project, folder.name), reference)
    # Training again from scratch completes and points the project at the new adapter.
    from datainf_core import train

    settings = train.TrainSettings(epochs=1, batch_size=8, patience=None)
    result = train.train_adapter(project, settings, out_dir=tmp_path / "retrained")
    assert load_project(project.root).adapter_path == result.adapter_path.resolve()


def test_kill_between_review_actions_loses_nothing(tmp_path):
    path = tmp_path / "reviews.sqlite"
    ReviewStore(path)
    process, marker = _spawn(tmp_path, "review", [str(path)])
    _wait_for(marker, process)
    time.sleep(0.05)  # the bulk batch is being written
    _kill(process)
    printed = [line for line in process.stdout.read().splitlines() if line.strip()]
    acknowledged = [int(line) for line in printed if line.isdigit()]
    assert acknowledged[:40] == list(range(40))  # acknowledged before the bulk batch began
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = ReviewStore(path)
    current = store.current().set_index("train_index")
    for i in acknowledged:  # every acknowledged action survived
        assert current.loc[i, "action"] == ("exclude" if i % 2 else "keep")
        assert current.loc[i, "note"] == f"n{i}"
    bulk = current.index[(current.index >= 1000)]
    assert len(bulk) in (0, 59000), "a batch was half written"
    if "bulk" in printed:
        assert len(bulk) == 59000
    assert len(store.log()) == len(current)  # one event per decision, no orphans
    # The store keeps working after the crash: undo the last batch, record a new action.
    store.undo()
    store.record(99999, "exclude")
    assert store.decision(99999)["action"] == "exclude"


# ---- atomic writes and concurrent writers ---------------------------------------------------------

ATOMIC_WRITER = textwrap.dedent(
    """
    import sys
    from datainf_core.project import write_atomic

    path = sys.argv[1]
    payloads = [b"A" * 4_000_000, b"B" * 4_000_000]
    i = 0
    while True:
        write_atomic(path, payloads[i % 2])
        i += 1
        if i == 2:
            print("ready", flush=True)
    """
)


def test_killed_atomic_writer_leaves_whole_file(tmp_path):
    target = tmp_path / "status.json"
    target.write_bytes(b"A" * 4_000_000)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for delay in (0.0, 0.03, 0.11):
        process = subprocess.Popen(
            [sys.executable, "-c", ATOMIC_WRITER, str(target)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout.readline().strip() == "ready"
        time.sleep(delay)
        _kill(process)
        content = target.read_bytes()
        assert len(content) == 4_000_000 and content.count(content[:1]) == len(content)
    # A killed writer may leave its hidden temporary file, never a torn target.
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")} == {"status.json"}


REVIEWER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from datainf_core.review import ReviewStore

    path, offset, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    store = ReviewStore(path)
    while not go.exists():
        time.sleep(0.01)
    for i in range(150):
        store.record(offset + i, "relabel", corrected_label=str(offset), note="w")
        if i % 25 == 0:  # a bulk batch too (undo is left out: the stack is shared)
            store.record([offset + 500 + i, offset + 501 + i], "exclude")
    print("done", flush=True)
    """
)


def test_two_processes_write_reviews_at_once(tmp_path):
    path = tmp_path / "reviews.sqlite"
    ReviewStore(path)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", REVIEWER, str(path), str(offset), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for offset in (0, 10_000)
    ]
    time.sleep(1.0)
    go.write_text("go")
    for writer in writers:
        out, err = writer.communicate(timeout=WAIT_S)
        assert writer.returncode == 0 and out.strip() == "done", err
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    current = ReviewStore(path).current()
    assert len(current) == 2 * (150 + 12)  # 150 relabels and 6 bulk pairs from each writer
    assert current["action"].value_counts().to_dict() == {"relabel": 300, "exclude": 24}
    relabels = current[current["action"] == "relabel"]
    by_writer = relabels.groupby("corrected_label")["train_index"].count().to_dict()
    assert by_writer == {"0": 150, "10000": 150}
