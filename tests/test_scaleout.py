"""Runs over several processes (gloo on CPU): sharded gradient collection, scoring, launching."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from fixtures import make_tiny_classification_project
from tolerances import DIST_RTOL, ENGINE_ATOL, GRAD_ATOL, GRAD_RTOL

from datainf_core import cli, distributed, runs
from datainf_core.project import Project
from datainf_core.store import GradientStore

SETTINGS = {"methods": ["datainf"], "per_query": True, "train_loss": False}
SHARD_SIZE = "5"  # 24 train rows → 5 shards (3 on rank 0, 2 on rank 1); 6 validation rows → 2


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    return make_tiny_classification_project(
        tmp_path_factory.mktemp("scaleout"), n_train=24, noise=0.25, n_validation=6
    )


@pytest.fixture(scope="module")
def reference(project: Project) -> dict[str, Any]:
    """A single-process run and its stores; the stores are then removed."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(runs.SHARD_SIZE_ENV, SHARD_SIZE)
        run_id = runs.execute_run(project, runs.RunSettings(**SETTINGS)).name
    stores = _stores(project)
    result = {
        "signals": _signals(project, run_id),
        "manifests": {split: store.manifest for split, store in stores.items()},
        "grads": {split: store.to_dict() for split, store in stores.items()},
    }
    shutil.rmtree(project.gradients_dir)
    return result


@pytest.fixture(autouse=True)
def small_shards(monkeypatch) -> None:
    monkeypatch.setenv(runs.SHARD_SIZE_ENV, SHARD_SIZE)  # inherited by the ranks


def _stores(project: Project) -> dict[str, GradientStore]:
    """Split → the one store of the project's gradients folder."""
    return {
        split: GradientStore.open(next((project.gradients_dir / split).iterdir()))
        for split in ("train", "validation")
    }


def _signals(project: Project, run_id: str) -> dict[str, np.ndarray]:
    frame = runs.load_signals(project, run_id)
    return {
        "datainf": frame["datainf"].to_numpy(),
        "self_influence": frame["self_influence"].to_numpy(),
        "per_query": runs.load_per_query(project, run_id)["score"].to_numpy(),
    }


def _assert_same_scores(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    for name, values in expected.items():
        np.testing.assert_allclose(
            got[name], values, rtol=DIST_RTOL, atol=ENGINE_ATOL, err_msg=name
        )


def _without(entry: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != key}


def test_nproc_2_collects_and_scores_like_one_process(project: Project, reference) -> None:
    run_id = runs.execute_run(project, runs.RunSettings(**SETTINGS, nproc=2)).name
    assert runs.read_status(project, run_id)["state"] == "done"
    for split, store in _stores(project).items():
        manifest, expected = store.manifest, reference["manifests"][split]
        assert store.path.name == expected["hash"][:20]  # same key hash, same folder
        assert _without(manifest, "shards") == _without(expected, "shards")
        assert [_without(s, "sha256") for s in manifest["shards"]] == [
            _without(s, "sha256") for s in expected["shards"]
        ]
        for name, values in store.to_dict().items():
            torch.testing.assert_close(
                values, reference["grads"][split][name], rtol=GRAD_RTOL, atol=GRAD_ATOL
            )
    assert not list(project.gradients_dir.rglob("*.tmp"))
    _assert_same_scores(_signals(project, run_id), reference["signals"])
    # A later single-process run reuses the store the two ranks wrote.
    mtimes = {p: p.stat().st_mtime_ns for p in project.gradients_dir.rglob("*")}
    runs.execute_run(project, runs.RunSettings(**SETTINGS))
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun_rank(rank: int, world: int, port: int, root: str, out: str, fail: int) -> None:
    """What torchrun does for each rank: set the variables, run ``datainf run``."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DATAINF_DIST_TIMEOUT="20",
    )  # fmt: skip
    torch.set_num_threads(1)
    if rank == fail:

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("simulated failure")

        distributed.compute_influence_distributed = broken  # this forked process only
    argv = ["run", root, "--run-id", f"torchrun-{fail}", "--method", "datainf", "--per-query"]
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = cli.main([*argv, "--no-train-loss", "--no-progress"])
    Path(f"{out}.{rank}").write_text(json.dumps({"code": code, "stderr": stderr.getvalue()}))


def _torchrun(project: Project, out: Path, fail: int) -> list[dict[str, Any]]:
    """Two ranks forked from this process (no re-import), as torchrun would start them."""
    args = (2, _free_port(), str(project.root), str(out), fail)
    mp.start_processes(_torchrun_rank, args=args, nprocs=2, join=True, start_method="fork")
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]


def test_torchrun_style_launch_equals_one_process(project: Project, reference, tmp_path) -> None:
    results = _torchrun(project, tmp_path / "rank", fail=-1)
    assert [r["code"] for r in results] == [0, 0], results
    assert runs.read_status(project, "torchrun--1")["state"] == "done"
    _assert_same_scores(_signals(project, "torchrun--1"), reference["signals"])


def test_failing_rank_gives_one_line_errors(project: Project, reference, tmp_path) -> None:
    results = _torchrun(project, tmp_path / "rank", fail=1)
    for rank, result in enumerate(results):
        lines = result["stderr"].strip().splitlines()
        assert result["code"] == cli.EXIT_USER_ERROR and len(lines) == 1, result
        assert lines[0].startswith(f"error: rank {rank} of 2 failed during scores: datainf")
    assert "simulated failure" in results[1]["stderr"]
    assert runs.read_status(project, "torchrun-1")["state"] == "failed"


def test_missing_rank_times_out_with_one_line_error(project: Project, monkeypatch, capsys) -> None:
    """Rank 0 of 2 whose partner never starts: a one-line error after the timeout, no hang."""
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                        "DATAINF_DIST_TIMEOUT": "2"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    code = cli.main(["run", str(project.root), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_USER_ERROR
    assert len(err.splitlines()) == 1 and "rank 0 of 2 could not join" in err, err


def test_projected_store_holds_the_projected_gradients(project: Project, reference) -> None:
    """--projection-dim: the store keeps P_b g per block (same P for train and validation)."""
    from datainf_core.projection import make_projection

    dim = 8
    settings = runs.RunSettings(**SETTINGS, projection_dim=dim)
    run_id = runs.execute_run(project, settings).name
    projected = {
        split: store
        for split, store in _stores_with(project, lambda s: s.manifest.get("projection")).items()
    }
    for split, store in projected.items():
        whole = reference["grads"][split]
        expected = make_projection(whole, dim=dim).apply(whole)
        got = store.to_dict()
        assert {name: t.shape[1] for name, t in got.items() if name != "__loss__"} == {
            name: min(dim, t.shape[1]) for name, t in whole.items()
        }
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    assert np.isfinite(_signals(project, run_id)["datainf"]).all()
    with pytest.raises(runs.RunError, match="projection_dim must be a positive integer"):
        runs.RunSettings(projection_dim=0).validate()
    shutil.rmtree(project.gradients_dir)


def _stores_with(project: Project, keep) -> dict[str, GradientStore]:
    """Split → the store of the project's gradients folder that ``keep`` accepts."""
    out = {}
    for split in ("train", "validation"):
        for folder in (project.gradients_dir / split).iterdir():
            store = GradientStore.open(folder)
            if keep(store):
                out[split] = store
    assert set(out) == {"train", "validation"}
    return out
