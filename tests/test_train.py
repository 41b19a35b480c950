"""LoRA fine-tuning on tiny random models: the loss falls, the adapter is saved and reloads."""

import json
from pathlib import Path

import pytest
from fixtures import make_tiny_classification_project, make_tiny_generation_project

from datainf_core import train as train_mod
from datainf_core.errors import DataInfError


def _classification_project(root: Path, seed: int = 0):
    return make_tiny_classification_project(root, n_train=48, noise=0.0, n_validation=16, seed=seed)


def test_settings_validate_with_one_line_messages() -> None:
    with pytest.raises(DataInfError, match="rank = 0"):
        train_mod.TrainSettings(rank=0)
    with pytest.raises(DataInfError, match="lr = 2"):
        train_mod.TrainSettings(lr=2.0)
    with pytest.raises(DataInfError, match="target_modules is empty"):
        train_mod.TrainSettings(target_modules=[])
    assert train_mod.TrainSettings(target_modules="query, value").target_modules == [
        "query",
        "value",
    ]


def test_classification_training_lowers_loss_and_adapter_reloads(tmp_path: Path) -> None:
    from datainf_core import models

    project = _classification_project(tmp_path / "proj")
    calls: list[tuple[int, int, str]] = []
    settings = train_mod.TrainSettings(epochs=4, lr=5e-3, batch_size=8, patience=None, seed=0)
    result = train_mod.train_adapter(project, settings, progress=lambda *a: calls.append(a))
    history = result.history
    assert len(history) == 4
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert result.best_val_loss == min(h["val_loss"] for h in history)
    assert calls[-1][0] == calls[-1][1] == 4 * 6 and calls[0][:2] == (1, 24)
    # Saved as safetensors, and the project points at it.
    assert (result.adapter_path / "adapter_model.safetensors").is_file()
    config = json.loads((result.adapter_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["query", "value"]
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert "classifier" in (config["modules_to_save"] or [])
    from datainf_core.project import load_project

    reloaded = load_project(project.root)
    assert reloaded.adapter_path == result.adapter_path.resolve()
    # The reloaded adapter reproduces the kept epoch's validation figures.
    figures = train_mod.evaluate_adapter(reloaded, device="cpu")
    assert figures["val_loss"] == pytest.approx(result.best_val_loss, rel=1e-4)
    assert figures["val_accuracy"] == pytest.approx(result.val_accuracy)
    model = models.load_adapted_model(reloaded, device="cpu")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)


def test_training_is_deterministic_and_early_stops(tmp_path: Path) -> None:
    settings = train_mod.TrainSettings(epochs=3, lr=5e-3, batch_size=8, patience=None, seed=1)
    first = train_mod.train_adapter(
        _classification_project(tmp_path / "a"), settings, out_dir=tmp_path / "ad_a"
    )
    second = train_mod.train_adapter(
        _classification_project(tmp_path / "b"), settings, out_dir=tmp_path / "ad_b"
    )
    assert [h["val_loss"] for h in first.history] == [h["val_loss"] for h in second.history]
    # A tiny patience with a learning rate too high to improve stops early and keeps the best.
    wild = train_mod.TrainSettings(epochs=6, lr=0.5, batch_size=8, patience=1, seed=1)
    result = train_mod.train_adapter(_classification_project(tmp_path / "c"), wild)
    assert len(result.history) < 6
    assert result.best_val_loss == min(h["val_loss"] for h in result.history)
    assert result.history[result.best_epoch - 1]["val_loss"] == result.best_val_loss


def test_stop_at_train_accuracy_keeps_last_epoch(tmp_path: Path) -> None:
    settings = train_mod.TrainSettings(
        epochs=3,
        lr=5e-3,
        batch_size=8,
        patience=None,
        restore_best=False,
        stop_at_train_accuracy=0.01,  # reached after the first epoch
    )
    result = train_mod.train_adapter(_classification_project(tmp_path / "p"), settings)
    assert len(result.history) == 1 and result.best_epoch == 1


def test_unknown_target_modules_raise(tmp_path: Path) -> None:
    settings = train_mod.TrainSettings(epochs=1, target_modules=["nonexistent_proj"])
    with pytest.raises(DataInfError, match="target_modules"):
        train_mod.train_adapter(_classification_project(tmp_path / "p"), settings)


def test_generation_training_lowers_loss(tmp_path: Path) -> None:
    project = make_tiny_generation_project(tmp_path, n_train=16, n_validation=4)
    settings = train_mod.TrainSettings(epochs=3, lr=1e-2, batch_size=4, patience=None)
    result = train_mod.train_adapter(project, settings)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.val_accuracy is None
    config = json.loads((result.adapter_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["task_type"] == "CAUSAL_LM"
    figures = train_mod.evaluate_adapter(project, device="cpu")
    assert figures["val_loss"] == pytest.approx(result.best_val_loss, rel=1e-4)
