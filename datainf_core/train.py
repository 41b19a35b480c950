"""LoRA fine-tuning with peft: the adapter that influence runs explain (``datainf train``).

Classification trains LoRA on the attention projections plus the classifier head (peft puts the
head in ``modules_to_save`` for ``SEQ_CLS``) with the cross-entropy of the labels as given;
generation trains the causal-LM loss on the tokens ``data.build_examples`` keeps (the project's
``[influence] loss_tokens``); text-to-image is handed to :func:`diffusion.train_unet_lora`.

The loop, in steps: 1. seed everything, 2. load the base model and wrap it with a fresh LoRA
adapter, 3. AdamW over the trainable tensors for up to ``epochs`` epochs, evaluating the
validation loss after each, 4. stop when it has not improved for ``patience`` epochs (or, for the
"fit the noise" regime, when the training accuracy on the given labels reaches
``stop_at_train_accuracy``), 5. restore the best epoch's adapter, 6. save it as safetensors and
point the project at it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from datainf_core.batching import IGNORE_INDEX, collate_examples
from datainf_core.device import resolve_device
from datainf_core.errors import DataInfError, ModelError
from datainf_core.models import causal_lm_logits

if TYPE_CHECKING:
    import pandas as pd

    from datainf_core.project import Project

logger = logging.getLogger(__name__)

Progress = Callable[..., Any]
ADAPTER_DIR = "adapter"
# LoRA targets by model family when the settings leave target_modules empty.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
}
FALLBACK_TARGETS = ["q_proj", "v_proj"]  # llama, mistral, qwen, ...


class TrainSettingsError(DataInfError, ValueError):
    """A fine-tuning setting (epochs, rank, learning rate, ...) is out of range."""


@dataclass
class TrainSettings:
    """Settings of one LoRA fine-tuning (saved next to the adapter as ``train_settings.json``).

    Attributes:
        epochs: Maximum number of passes over the training set.
        rank: LoRA rank ``r``.
        alpha: LoRA ``lora_alpha`` (scaling = alpha / rank).
        lr: AdamW learning rate.
        batch_size: Samples per optimizer step.
        target_modules: Module names that get LoRA; None picks by model family
            (``query``/``value`` for BERT-like models, ``q_proj``/``v_proj`` for Llama-like ones).
        patience: Stop after this many epochs without a lower validation loss; None trains all
            ``epochs``.
        seed: Seed of the head and LoRA initialisation and of the batch order.
        weight_decay: AdamW weight decay.
        dropout: LoRA dropout.
        restore_best: Keep the epoch with the lowest validation loss (else the last epoch).
        stop_at_train_accuracy: Stop once the training accuracy on the labels as given (flipped
            ones included) reaches this share; classification only. Used to reach the regime in
            which the model has fit the noise.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    """

    epochs: int = 20
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3
    batch_size: int = 16
    target_modules: list[str] | None = None
    patience: int | None = 2
    seed: int = 0
    weight_decay: float = 0.0
    dropout: float = 0.0
    restore_best: bool = True
    stop_at_train_accuracy: float | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("epochs", self.epochs >= 1, "an integer >= 1, e.g. 20"),
            ("rank", self.rank >= 1, "an integer >= 1, e.g. 8"),
            ("alpha", self.alpha > 0, "a positive number, e.g. 16"),
            ("lr", 0 < self.lr < 1, "a learning rate in (0, 1), e.g. 1e-3"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1, e.g. 16"),
            ("patience", self.patience is None or self.patience >= 1, "an integer >= 1 or None"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("dropout", 0 <= self.dropout < 1, "a share in [0, 1)"),
            (
                "stop_at_train_accuracy",
                self.stop_at_train_accuracy is None or 0 < self.stop_at_train_accuracy <= 1,
                "a share in (0, 1] or None",
            ),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise TrainSettingsError(
                    f"training setting {name} = {getattr(self, name)!r} is invalid; use {expected}"
                )
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [t.strip() for t in self.target_modules.split(",")]
            self.target_modules = [t for t in self.target_modules if t]
            if not self.target_modules:
                raise TrainSettingsError(
                    "training setting target_modules is empty; name modules like query,value or "
                    "leave it unset"
                )


@dataclass
class TrainResult:
    """Outcome of :func:`train_adapter`.

    Attributes:
        adapter_path: Folder of the saved adapter (``adapter_model.safetensors`` + config).
        history: One dict per epoch: ``epoch``, ``train_loss``, ``train_accuracy``, ``val_loss``,
            ``val_accuracy`` (None for generation), ``seconds``.
        best_val_loss: Validation loss of the kept adapter.
        val_accuracy: Validation accuracy of the kept adapter (None for generation).
        best_epoch: Epoch of the kept adapter (1-based).
        seconds: Wall time of the whole fine-tuning.
    """

    adapter_path: Path
    history: list[dict[str, Any]]
    best_val_loss: float | None
    val_accuracy: float | None = None
    best_epoch: int | None = None
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)


def default_target_modules(model: nn.Module) -> list[str]:
    """LoRA target names for the model's family (see :data:`DEFAULT_TARGETS`)."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    return list(DEFAULT_TARGETS.get(model_type, FALLBACK_TARGETS))


def add_lora(model: nn.Module, settings: TrainSettings, *, task: str) -> Any:
    """Wraps ``model`` in a fresh trainable LoRA adapter (peft ``get_peft_model``).

    For classification peft adds the classifier head to ``modules_to_save`` (trained in full).

    Raises:
        ModelError: None of the target modules exists in the model.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    targets = settings.target_modules or default_target_modules(model)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names and not any(t in n for n in names)]
    if len(missing) == len(targets):
        raise ModelError(
            f"target_modules {targets} match no layer of the base model; pick names from its "
            f"layers, e.g. {sorted(n for n in names if n)[:6]}"
        )
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
    )
    return get_peft_model(model, config)


def _batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def _batch_stats(
    model: nn.Module, batch: dict[str, torch.Tensor], task: str
) -> tuple[torch.Tensor, int, int]:
    """Mean loss of a batch, and (correct, counted) predictions for classification."""
    if task == "generation":
        # Mean over the tokens with a target, as transformers computes it, with logits only
        # where a target is (most prompt positions skip the vocabulary-sized output layer).
        logits, targets = causal_lm_logits(
            model, batch["input_ids"], batch["attention_mask"], batch["labels"]
        )
        loss = F.cross_entropy(
            logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
        )
        return loss, 0, 0
    output = model(**batch)
    if task != "classification":
        return output.loss, 0, 0
    logits = output.logits  # batch_size x num_labels
    correct = int((logits.argmax(dim=-1) == batch["labels"]).sum())
    return output.loss, correct, int(batch["labels"].numel())


def evaluate_examples(
    model: nn.Module,
    examples: Sequence[dict[str, torch.Tensor]],
    *,
    task: str,
    batch_size: int = 32,
    pad_token_id: int = 0,
    device: str | torch.device = "auto",
) -> dict[str, float | None]:
    """Mean loss (per sample; per token for generation) and accuracy of ``model`` on examples.

    Returns:
        ``loss`` and ``accuracy`` (None for generation).
    """
    resolved = resolve_device(device)
    was_training = model.training
    model.eval()
    total_loss, weight, correct, counted = 0.0, 0, 0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                chunk = list(examples[start : start + batch_size])
                batch = _batch_to(collate_examples(chunk, pad_token_id=pad_token_id), resolved)
                loss, hits, seen = _batch_stats(model, batch, task)
                if task == "classification":
                    size = len(chunk)
                else:  # the model averages over tokens that count (after the shift)
                    size = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                total_loss += float(loss) * size
                weight += size
                correct += hits
                counted += seen
    finally:
        model.train(was_training)
    return {
        "loss": total_loss / max(weight, 1),
        "accuracy": correct / counted if counted else None,
    }


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _restore_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _store_adapter_path(project: Project, out_dir: Path) -> str:
    try:
        return out_dir.resolve().relative_to(project.root.resolve()).as_posix()
    except ValueError:
        return str(out_dir.resolve())


def fit_lora(
    model: nn.Module,
    train_examples: Sequence[dict[str, torch.Tensor]],
    val_examples: Sequence[dict[str, torch.Tensor]],
    settings: TrainSettings,
    *,
    task: str,
    pad_token_id: int = 0,
    progress: Progress | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Trains the model's trainable tensors in place (steps 3-5 of the module docstring).

    Returns:
        ``(history, kept_epoch)``; the model holds the kept epoch's weights, in eval mode.
    """
    device = resolve_device(settings.device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    order_rng = torch.Generator().manual_seed(settings.seed)
    n = len(train_examples)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    history: list[dict[str, Any]] = []
    best_loss, best_epoch, best_state, stale = math.inf, 0, _trainable_state(model), 0
    step = 0
    for epoch in range(1, settings.epochs + 1):
        began = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=order_rng).tolist()
        loss_sum, correct, counted = 0.0, 0, 0
        for start in range(0, n, settings.batch_size):
            chunk = [train_examples[i] for i in order[start : start + settings.batch_size]]
            batch = _batch_to(collate_examples(chunk, pad_token_id=pad_token_id), device)
            loss, hits, seen = _batch_stats(model, batch, task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
            optimizer.step()
            loss_sum += loss.item() * len(chunk)
            correct += hits
            counted += seen
            step += 1
            if progress is not None:
                progress(step, total_steps, f"training epoch {epoch}/{settings.epochs}")
        val = evaluate_examples(
            model, val_examples, task=task, pad_token_id=pad_token_id, device=device
        )
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / n,
            "train_accuracy": correct / counted if counted else None,
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "seconds": time.perf_counter() - began,
        }
        history.append(record)
        logger.info(
            "epoch %d: train loss %.4f (accuracy %s), validation loss %.4f (accuracy %s) "
            "in %.2f seconds",
            epoch,
            record["train_loss"],
            record["train_accuracy"],
            record["val_loss"],
            record["val_accuracy"],
            record["seconds"],
        )
        assert val["loss"] is not None
        if val["loss"] < best_loss:
            best_loss, best_epoch, stale = float(val["loss"]), epoch, 0
            best_state = _trainable_state(model)
        else:
            stale += 1
        target = settings.stop_at_train_accuracy
        if target is not None and counted and correct / counted >= target:
            logger.info("training accuracy %.4f reached %.4f: stopping", correct / counted, target)
            break
        if settings.patience is not None and stale >= settings.patience:
            logger.info("validation loss did not improve for %d epochs: stopping", stale)
            break
    if progress is not None:
        progress(total_steps, total_steps, "training done")
    kept = len(history)
    if settings.restore_best and best_epoch > 0:
        _restore_state(model, best_state)
        kept = best_epoch
    model.eval()
    return history, kept


def train_adapter(
    project: Project,
    settings: TrainSettings | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    train_df: pd.DataFrame | None = None,
    progress: Progress | None = None,
    update_project: bool = True,
) -> TrainResult:
    """Fine-tunes a fresh LoRA adapter on the project's train set, saves it, points the project at it.

    Args:
        project: A classification, generation or text-to-image project (its current adapter, if
            any, is not used: training starts from the base model).
        settings: Training settings (defaults: :class:`TrainSettings`).
        out_dir: Adapter folder; ``<project>/adapter`` when None.
        train_df: A training table to use instead of the project's train file (e.g. a cleaned
            export); same columns.
        progress: Called as ``progress(done_steps, total_steps, stage)`` after every step.
        update_project: Point ``project.toml`` at the new adapter (False leaves it untouched,
            e.g. for a retraining experiment).

    Returns:
        The adapter folder, the per-epoch history and the kept epoch's validation figures.

    Raises:
        DataInfError: Bad settings, data or model (one-line message).
    """
    from datainf_core import data, models

    settings = settings or TrainSettings()
    began = time.perf_counter()
    out_path = Path(out_dir) if out_dir is not None else project.root / ADAPTER_DIR
    if project.task == "text-to-image":
        from datainf_core import diffusion

        result = diffusion.train_unet_lora(
            project, settings, out_dir=out_path, train_df=train_df, progress=progress
        )
        return TrainResult(
            adapter_path=Path(result.adapter_path),
            history=list(result.history),
            best_val_loss=result.best_val_loss,
            val_accuracy=result.val_accuracy,
            seconds=time.perf_counter() - began,
            settings=asdict(settings),
        )
    # 1. Seed before the head and LoRA are initialised.
    torch.manual_seed(settings.seed)
    # 2. Data and model.
    tokenizer = models.load_tokenizer(project)
    train_df = data.load_split(project, "train") if train_df is None else train_df
    val_df = data.load_split(project, "validation")
    train_examples = data.build_examples(project, train_df, tokenizer)
    val_examples = data.build_examples(project, val_df, tokenizer)
    if not train_examples:
        raise DataInfError("the training table has no rows; give at least one training sample")
    base = models.load_base_model(project, device="cpu")
    model = add_lora(base, settings, task=project.task)
    pad_id = int(tokenizer.pad_token_id or 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "training LoRA r=%d on %s: %d trainable parameters, %d train / %d validation samples",
        settings.rank,
        settings.target_modules or default_target_modules(base),
        trainable,
        len(train_examples),
        len(val_examples),
    )
    # 3.-5. Fit with early stopping, restore the best epoch.
    history, kept = fit_lora(
        model,
        train_examples,
        val_examples,
        settings,
        task=project.task,
        pad_token_id=pad_id,
        progress=progress,
    )
    # 6. Save (safetensors) and point the project at the adapter.
    model.to("cpu")
    out_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(os.fspath(out_path), safe_serialization=True)
    _write_settings(out_path, settings, history, kept)
    if update_project:
        project.model.adapter = _store_adapter_path(project, out_path)
        project.save()
    best = history[kept - 1]
    seconds = time.perf_counter() - began
    logger.info(
        "saved adapter %s (epoch %d, validation loss %.4f) in %.2f seconds",
        out_path,
        kept,
        best["val_loss"],
        seconds,
    )
    return TrainResult(
        adapter_path=out_path,
        history=history,
        best_val_loss=float(best["val_loss"]),
        val_accuracy=best["val_accuracy"],
        best_epoch=kept,
        seconds=seconds,
        settings=asdict(settings),
    )


def _write_settings(
    out_path: Path, settings: TrainSettings, history: list[dict[str, Any]], kept: int
) -> None:
    import json

    from datainf_core.project import write_atomic

    content = {"settings": asdict(settings), "kept_epoch": kept, "history": history}
    write_atomic(out_path / "train_settings.json", json.dumps(content, indent=2) + "\n")


def evaluate_adapter(
    project: Project,
    *,
    df: pd.DataFrame | None = None,
    batch_size: int = 32,
    device: str = "auto",
) -> dict[str, float | None]:
    """Loss and accuracy of the project's adapter on its validation set (or on ``df``).

    Returns:
        ``val_loss`` and ``val_accuracy`` (None for generation).
    """
    from datainf_core import data, models

    if project.task == "text-to-image":
        raise NotImplementedError(
            "evaluate_adapter covers classification and generation; for text-to-image use "
            "diffusion.evaluate_denoising_loss"
        )
    tokenizer = models.load_tokenizer(project)
    df = data.load_split(project, "validation") if df is None else df
    examples = data.build_examples(project, df, tokenizer)
    model = models.load_adapted_model(project, device=device, is_trainable=False)
    out = evaluate_examples(
        model,
        examples,
        task=project.task,
        batch_size=batch_size,
        pad_token_id=int(tokenizer.pad_token_id or 0),
        device=device,
    )
    return {"val_loss": out["loss"], "val_accuracy": out["accuracy"]}
