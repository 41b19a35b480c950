"""runs.py: train → run on tiny random models, run folder contents, cache, cancel, worker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures import make_tiny_classification_project, make_tiny_generation_project
from tolerances import ENGINE_ATOL, ENGINE_RTOL

from datainf_core import data, evaluate, models, runs
from datainf_core.errors import DataInfError
from datainf_core.project import Project, load_project


@pytest.fixture(scope="module")
def cls_project(tmp_path_factory) -> Project:
    return make_tiny_classification_project(
        tmp_path_factory.mktemp("runs"), n_train=24, noise=0.25, n_validation=6, with_category=True
    )


@pytest.fixture(scope="module")
def finished_run(cls_project: Project) -> str:
    settings = runs.RunSettings(methods=["datainf", "hessian_free_cosine"], per_query=True)
    stages = []
    folder = runs.execute_run(cls_project, settings, progress=lambda d, t, s: stages.append(s))
    assert stages[0] == "load" and "evaluate" in stages
    return folder.name


def evaluation_weights(project: Project, run_id: str) -> dict[str, float]:
    return runs.load_evaluation(project, run_id)["combined_weights"]


def test_run_folder_contents(cls_project: Project, finished_run: str) -> None:
    folder = cls_project.runs_dir / finished_run
    for name in ("settings.json", "status.json", "timings.json", "scores.parquet",
                 "per_query.parquet", "signals.parquet", "evaluation.json"):  # fmt: skip
        assert (folder / name).is_file(), name
    status = runs.read_status(cls_project, finished_run)
    assert status["state"] == "done" and status["error"] is None
    scores = runs.load_scores(cls_project, finished_run)
    assert list(scores.columns) == ["train_index", "method", "score"]
    # The companion datainf_cosine is scored too (aggregate only): the combined ranking's input.
    assert len(scores) == 3 * 24
    assert set(scores["method"]) == {"datainf", "hessian_free_cosine", "datainf_cosine"}
    per_query = runs.load_per_query(cls_project, finished_run)
    assert list(per_query.columns) == ["query_index", "train_index", "method", "score"]
    assert len(per_query) == 2 * 6 * 24
    assert set(per_query["method"]) == {"datainf", "hessian_free_cosine"}
    signals = runs.load_signals(cls_project, finished_run)
    assert list(signals.columns) == [
        "train_index", "datainf", "hessian_free_cosine", "datainf_cosine", "self_influence",
        "train_loss", "combined",
    ]  # fmt: skip
    np.testing.assert_allclose(
        signals["combined"], evaluate.combined_ranking(signals.drop(columns=["combined"]))
    )
    assert evaluation_weights(cls_project, finished_run) == {
        "datainf_cosine": 0.3333, "hessian_free_cosine": 0.3333, "self_influence": 0.3333
    }  # fmt: skip
    assert signals["train_index"].tolist() == list(range(24))
    evaluation = runs.load_evaluation(cls_project, finished_run)
    assert set(evaluation["detection_auc"]) >= {"datainf", "train_loss", "combined"}
    assert set(evaluation["identification"]) == {"datainf", "hessian_free_cosine"}
    timings = runs.load_timings(cls_project, finished_run)
    assert {"load", "train gradients", "validation gradients", "scores: datainf"} <= set(timings)
    assert runs.load_settings(cls_project, finished_run).methods == [
        "datainf",
        "hessian_free_cosine",
    ]


def test_run_scores_equal_engine_on_fresh_gradients(
    cls_project: Project, finished_run: str
) -> None:
    from datainf_core.gradients import collect_gradients, per_sample_losses
    from datainf_core.influence import compute_influence

    model = models.load_adapted_model(cls_project, device="cpu")
    tokenizer = models.load_tokenizer(cls_project)
    train = data.build_examples(cls_project, data.load_split(cls_project, "train"), tokenizer)
    query = data.build_examples(cls_project, data.load_split(cls_project, "validation"), tokenizer)
    common = {"task": "classification", "batch_size": 8, "device": "cpu"}
    train_grads = collect_gradients(model, train, **common)
    query_grads = collect_gradients(model, query, **common)
    expected = compute_influence(train_grads, query_grads, method="datainf", damping=0.1)
    signals = runs.load_signals(cls_project, finished_run)
    np.testing.assert_allclose(
        signals["datainf"], expected.double().numpy(), rtol=ENGINE_RTOL, atol=ENGINE_ATOL
    )
    matrix = compute_influence(
        train_grads, query_grads, method="hessian_free", aggregate=None, unit_norm=True
    )
    per_query = runs.load_per_query(cls_project, finished_run)
    wide = per_query[per_query["method"] == "hessian_free_cosine"].pivot(
        index="query_index", columns="train_index", values="score"
    )
    np.testing.assert_allclose(
        wide.to_numpy(), matrix.double().numpy(), rtol=ENGINE_RTOL, atol=ENGINE_ATOL
    )
    losses = per_sample_losses(model, train, **common)
    np.testing.assert_allclose(signals["train_loss"], losses.double().numpy(), rtol=1e-5, atol=1e-6)
    # The fit check: mean training loss over mean validation loss, from fresh losses.
    fit = runs.load_evaluation(cls_project, finished_run)["fit"]
    val_losses = per_sample_losses(model, query, **common).double().numpy()
    train_mean, val_mean = losses.double().mean().item(), val_losses.mean()
    assert fit["train_loss_mean"] == pytest.approx(train_mean, rel=1e-5)
    assert fit["validation_loss_mean"] == pytest.approx(val_mean, rel=1e-5)
    assert fit["ratio"] == pytest.approx(train_mean / val_mean, rel=1e-3)
    assert fit["fits_training_better"] == (train_mean < val_mean)


def test_second_run_reuses_gradient_store(cls_project: Project, finished_run: str) -> None:
    before = sorted(p.name for p in (cls_project.gradients_dir / "train").iterdir())
    folder = runs.execute_run(
        cls_project, runs.RunSettings(methods=["exact"], self_influence=False)
    )
    after = sorted(p.name for p in (cls_project.gradients_dir / "train").iterdir())
    assert before == after  # same key → same store, no second store
    assert folder.name > finished_run  # ids sort by time
    listed = runs.list_runs(cls_project)
    assert [info.run_id for info in listed][:2] == [folder.name, finished_run]
    assert runs.latest_run(cls_project) == folder.name
    signals = runs.load_signals(cls_project, folder.name)
    assert "self_influence" not in signals.columns and "exact" in signals.columns


def test_cancel_file_stops_the_run(cls_project: Project) -> None:
    run_id = runs.new_run_id()
    folder = runs.run_dir(cls_project, run_id)
    folder.mkdir(parents=True)
    runs.cancel_run(cls_project, run_id)
    with pytest.raises(runs.RunCancelled, match=f"run {run_id} was cancelled"):
        runs.execute_run(cls_project, runs.RunSettings(), run_id=run_id)
    status = runs.read_status(cls_project, run_id)
    assert status["state"] == "cancelled"
    assert not (folder / "scores.parquet").exists()


def test_failure_is_recorded_in_status(cls_project: Project, tmp_path: Path) -> None:
    root = tmp_path / "broken"
    shutil.copytree(cls_project.root, root, ignore=shutil.ignore_patterns("runs", "gradients"))
    project = load_project(root)
    bad = pd.DataFrame({"text": ["x"], "label": ["neutral"], "category": ["negative"]})
    bad.to_csv(root / "validation.csv", index=False)
    with pytest.raises(DataInfError, match="label 'neutral'"):
        runs.execute_run(project, runs.RunSettings(), run_id="r1")
    status = runs.read_status(project, "r1")
    assert status["state"] == "failed" and "neutral" in status["error"]


@pytest.mark.parametrize(
    ("settings", "pattern"),
    [
        (runs.RunSettings(methods=[]), "no influence method"),
        (runs.RunSettings(methods=["tracin"]), "unknown influence method 'tracin'"),
        (runs.RunSettings(methods=["exact", "exact"]), "repeat a name"),
        (runs.RunSettings(damping=0.0), "damping must be positive"),
        (runs.RunSettings(damping=float("nan")), "damping must be a finite number"),
        (runs.RunSettings(loss_tokens="middle"), "loss_tokens 'middle'"),
        (runs.RunSettings(nproc=0), "nproc must be at least 1"),
        (runs.RunSettings(device="tpu9"), "unknown device 'tpu9'"),
        (runs.RunSettings(device="cuda:99"), "device 'cuda:99' is not available"),
    ],
)
def test_run_settings_validation(settings: runs.RunSettings, pattern: str) -> None:
    with pytest.raises(runs.RunError, match=pattern):
        settings.validate()


def test_missing_results_and_bad_ids(cls_project: Project) -> None:
    with pytest.raises(runs.RunError, match="not found"):
        runs.load_scores(cls_project, "19990101-000000-000-0000")
    with pytest.raises(runs.RunError, match="invalid run id"):
        runs.read_status(cls_project, "../etc")


def test_dead_worker_reads_as_failed(cls_project: Project) -> None:
    folder = runs.run_dir(cls_project, "dead")
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    runs.write_json(
        folder / "status.json", {"state": "running", "stage": "train gradients", "pid": process.pid}
    )
    status = runs.read_status(cls_project, "dead")
    assert (
        status["state"] == "failed" and "worker stopped during train gradients" in status["error"]
    )


def test_nan_scores_are_a_user_error() -> None:
    with pytest.raises(runs.RunError, match="NaN/inf.*float32"):
        runs._check_finite("training loss", torch.tensor([1.0, float("nan")]))


def test_train_then_run(tmp_path: Path) -> None:
    """The whole pipeline on a tiny random BERT: fine-tune an adapter, then score with it."""
    from datainf_core.train import TrainSettings, train_adapter

    project = make_tiny_classification_project(tmp_path, n_train=24, noise=0.25, n_validation=6)
    settings = TrainSettings(
        epochs=2, rank=2, alpha=4, lr=1e-2, batch_size=8, patience=None, device="cpu"
    )
    result = train_adapter(project, settings)
    project = load_project(project.root)
    assert project.adapter_path == Path(result.adapter_path).resolve()
    folder = runs.execute_run(project, runs.RunSettings(methods=["datainf", "exact"], device="cpu"))
    evaluation = runs.load_evaluation(project, folder.name)
    assert 0.0 <= evaluation["detection_auc"]["datainf"] <= 1.0
    assert (
        np.isfinite(runs.load_signals(project, folder.name).drop(columns="train_index")).all().all()
    )


def test_generation_run_with_identification(tmp_path: Path) -> None:
    project = make_tiny_generation_project(tmp_path, n_train=8, n_validation=4)
    folder = runs.execute_run(
        project, runs.RunSettings(methods=["datainf"], per_query=True, loss_tokens="all")
    )
    saved = json.loads((folder / "settings.json").read_text())
    assert saved["loss_tokens"] == "all"
    evaluation = runs.load_evaluation(project, folder.name)
    assert "detection_auc" not in evaluation  # no is_noisy column
    assert 0.0 <= evaluation["identification"]["datainf"]["auc_mean"] <= 1.0


def test_background_worker(cls_project: Project) -> None:
    """start_run_process → a detached `python -m datainf_core run` that reports through status.json."""
    run_id = runs.start_run_process(
        cls_project, runs.RunSettings(methods=["hessian_free"], train_loss=False)
    )
    assert runs.read_status(cls_project, run_id)["state"] in ("queued", "running", "done")
    deadline = time.time() + 240
    while time.time() < deadline:
        status = runs.read_status(cls_project, run_id)
        if status["state"] in runs.FINISHED:
            break
        time.sleep(0.5)
    log = (cls_project.runs_dir / run_id / "worker.log").read_text()
    assert status["state"] == "done", (status, log[-2000:])
    scores = runs.load_scores(cls_project, run_id)
    assert scores.groupby("method").size().to_dict() == {
        "hessian_free": 24, "datainf_cosine": 24, "hessian_free_cosine": 24
    }  # fmt: skip
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_interrupted_run_then_rerun_gives_the_same_scores(
    cls_project: Project, finished_run: str, monkeypatch
) -> None:
    from datainf_core import influence

    settings = runs.load_settings(cls_project, finished_run)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(influence, "compute_self_influence", interrupted)
        with pytest.raises(KeyboardInterrupt):
            runs.execute_run(cls_project, settings, run_id="interrupted")
    status = runs.read_status(cls_project, "interrupted")
    assert status["state"] == "cancelled" and status["stage"] == "self-influence"
    assert not (cls_project.runs_dir / "interrupted" / "signals.parquet").exists()
    again = runs.execute_run(cls_project, settings)
    pd.testing.assert_frame_equal(
        runs.load_signals(cls_project, again.name), runs.load_signals(cls_project, finished_run)
    )


@pytest.mark.slow
def test_text_to_image_run(tmp_path: Path) -> None:
    """A tiny random Stable Diffusion folder with a diffusers LoRA file, imagefolder data."""
    from test_diffusion import make_sd_folder, write_imagefolder

    from datainf_core.project import create_project

    base, lora_file = make_sd_folder(tmp_path)
    write_imagefolder(tmp_path / "p" / "train", 2)
    write_imagefolder(tmp_path / "p" / "val", 2)
    project = create_project(
        tmp_path / "p", task="text-to-image", base=str(base), adapter=str(lora_file),
        train="train", validation="val", category_column="category", batch_size=4,
    )  # fmt: skip
    folder = runs.execute_run(project, runs.RunSettings(methods=["datainf"], per_query=True))
    signals = runs.load_signals(project, folder.name)
    assert list(signals.columns) == [
        "train_index",
        "datainf",
        "datainf_cosine",
        "hessian_free_cosine",
        "self_influence",
        "train_loss",
        "combined",
    ]
    assert np.isfinite(signals.drop(columns="train_index").to_numpy()).all()
    assert "identification" in runs.load_evaluation(project, folder.name)
