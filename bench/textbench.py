"""Shared set-up of the text-demo benchmarks (fidelity, peers): small cached projects, gradients.

A small version of the offline text demo (``demos.text.generate_text_data``: sentiment sentences,
20% of training labels flipped) is written and a MiniLM LoRA adapter trained on it, once per
(size, seed, rank), under ``.cache/bench/`` in the repo (gitignored). Later runs reuse it, so the
benchmarks time what they measure, not the fine-tuning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench"
RESULTS = REPO / "bench" / "results"

logger = logging.getLogger(__name__)


def quiet() -> None:
    """Logging to stderr at INFO for the bench, transformers' own chatter off."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def train_settings(rank: int, *, seed: int, max_epochs: int) -> Any:
    """The demo's default (early-stopping) settings at LoRA rank ``rank`` (alpha = 2 · rank)."""
    from datainf_core.demos.text import demo_train_settings

    base = demo_train_settings(seed=seed)
    return dataclasses.replace(base, rank=rank, alpha=2.0 * rank, epochs=max_epochs)


def text_project(
    size: int, *, seed: int = 0, rank: int = 8, noise: float = 0.2, max_epochs: int = 5
) -> tuple[Any, dict[str, Any]]:
    """A cached small text-demo project with a trained rank-``rank`` adapter.

    Returns:
        ``(project, info)``: info has ``cached`` (bool), ``train_seconds``, ``val_accuracy``,
        ``best_epoch``.
    """
    from datainf_core.demos.text import build_text_demo
    from datainf_core.project import load_project

    root = CACHE / f"text-n{size}-noise{noise}-seed{seed}-e{max_epochs}" / f"r{rank}"
    info_path = root / "bench_info.json"
    if info_path.exists() and (root / "project.toml").exists():
        info = json.loads(info_path.read_text())
        info["cached"] = True
        return load_project(root), info
    if root.exists():
        import shutil

        shutil.rmtree(root)
    started = time.perf_counter()
    settings = train_settings(rank, seed=seed, max_epochs=max_epochs)
    project = build_text_demo(root, size=size, noise=noise, seed=seed, settings=settings)
    seconds = time.perf_counter() - started
    history_file = Path(project.adapter_path or root) / "train_settings.json"
    val_accuracy = None
    best_epoch = None
    if history_file.exists():
        saved = json.loads(history_file.read_text())
        best_epoch = saved.get("kept_epoch") or saved.get("best_epoch")
        history = saved.get("history") or []
        kept = [h for h in history if h.get("epoch") == best_epoch] or history[-1:]
        if kept:
            val_accuracy = kept[0].get("val_accuracy")
    info = {
        "train_seconds": round(seconds, 1),
        "val_accuracy": val_accuracy,
        "best_epoch": best_epoch,
    }
    info_path.write_text(json.dumps(info))
    info["cached"] = False
    return project, info


@dataclass
class TextInputs:
    """What the text benchmarks share: the adapted model, tables and examples."""

    project: Any
    model: torch.nn.Module
    tokenizer: Any
    train_df: pd.DataFrame
    validation_df: pd.DataFrame
    train_examples: list[dict[str, torch.Tensor]]
    validation_examples: list[dict[str, torch.Tensor]]


def load_inputs(project: Any) -> TextInputs:
    """Loads the project's adapted model (CPU), tables and tokenized examples."""
    from datainf_core.data import build_examples, load_split
    from datainf_core.models import load_adapted_model, load_tokenizer

    tokenizer = load_tokenizer(project)
    model = load_adapted_model(project, device="cpu", is_trainable=True)
    train_df = load_split(project, "train")
    validation_df = load_split(project, "validation")
    return TextInputs(
        project=project,
        model=model,
        tokenizer=tokenizer,
        train_df=train_df,
        validation_df=validation_df,
        train_examples=build_examples(project, train_df, tokenizer),
        validation_examples=build_examples(project, validation_df, tokenizer),
    )


def collect(inputs: TextInputs, *, batch_size: int = 32, cache: bool = False) -> dict[str, Any]:
    """Per-sample gradients of train and validation samples with this repo's gradients module.

    Args:
        inputs: From :func:`load_inputs`.
        batch_size: Samples per batched backward pass.
        cache: Reuse ``gradients.pt`` in the project folder when present (else write it); for
            benchmarks that measure the scores, not the time to collect gradients.

    Returns:
        ``train`` and ``query`` (block → ``n x d`` / ``m x d``), ``losses`` (n,), ``seconds``
        (of the collection that made them), ``cached`` (bool).
    """
    from datainf_core.gradients import collect_gradients, collect_gradients_and_losses

    path = Path(inputs.project.root) / "gradients.pt"
    if cache and path.exists():
        saved = torch.load(path, weights_only=True)
        saved["cached"] = True
        return saved
    started = time.perf_counter()
    train, losses = collect_gradients_and_losses(
        inputs.model, inputs.train_examples, task="classification", batch_size=batch_size
    )
    query = collect_gradients(
        inputs.model, inputs.validation_examples, task="classification", batch_size=batch_size
    )
    result = {
        "train": train,
        "query": query,
        "losses": losses,
        "seconds": time.perf_counter() - started,
    }
    if cache:
        torch.save(result, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return {**result, "cached": False}


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Writes ``bench/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=float))
    return path
