"""Peers side by side: kronfluence (EK-FAC, identity) and dattri's DataInf vs this engine.

All tools score the same training samples of the same small text-demo project (MiniLM + rank-8
LoRA, 20% flipped labels; cached under .cache/bench/) against the same validation queries, over the
same adapter tensors (the LoRA A/B matrices and the classifier head). For each: wall time
(gradients included — each tool computes its own) and mislabel-detection AUC of the aggregate
score (mean over queries; sign made "positive = harmful" for every tool), plus the Pearson
correlation with this engine's matching method. Writes bench/results/peers.json.

    .venv/bin/python bench/bench_peers.py [--size 600]

Peers come from bench/requirements-bench.txt; a peer that is not installed gets a row saying so.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import textbench  # noqa: E402

logger = logging.getLogger("bench_peers")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def padded(examples: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """All examples padded to one length: input_ids, attention_mask (n x T), labels (n,)."""
    from datainf_core.batching import collate_examples

    return collate_examples(examples, pad_token_id=pad_token_id)


class _Rows(torch.utils.data.Dataset):
    """Rows of a padded batch as dicts (kronfluence's default collate stacks them back)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


def adapter_linear_names(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules that hold the adapter tensors (LoRA A/B, saved head)."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.endswith(("lora_A.default", "lora_B.default", "modules_to_save.default")):
            names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# This engine
# ---------------------------------------------------------------------------------------------


def run_ours(inputs: textbench.TextInputs, methods: list[str]) -> dict[str, dict[str, Any]]:
    """Gradients (this repo) + compute_influence for each method; scores and seconds."""
    from datainf_core.influence import compute_influence

    grads = textbench.collect(inputs)
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        started = time.perf_counter()
        scores = compute_influence(grads["train"], grads["query"], method=method, aggregate="mean")
        out[method] = {
            "scores": scores.double().numpy(),
            "seconds": grads["seconds"] + time.perf_counter() - started,
            "score_seconds": time.perf_counter() - started,
        }
    out["_grads"] = grads
    return out


def relative_lambda(grads: dict[str, torch.Tensor], damping: float = 0.1) -> float:
    """This engine's default λ (damping · mean ‖g‖² / d), averaged over blocks."""
    values = [damping * float((g.double() ** 2).sum(1).mean()) / g.shape[1] for g in grads.values()]
    return float(np.mean(values))


# ---------------------------------------------------------------------------------------------
# kronfluence
# ---------------------------------------------------------------------------------------------


def run_kronfluence(
    inputs: textbench.TextInputs, strategy: str, workdir: Path, batch_size: int
) -> dict[str, Any]:
    """kronfluence pairwise scores (queries x train) with ``strategy``; mean over queries.

    kronfluence's score is positive for training samples that lower the query loss (helpful), so
    the aggregate is negated to this project's convention (positive = harmful).
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    from datainf_core.models import load_adapted_model

    model = load_adapted_model(inputs.project, device="cpu", is_trainable=True)
    tracked = adapter_linear_names(model)

    class ClassificationTask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            if not sample:
                return F.cross_entropy(logits, batch["labels"], reduction="sum")
            with torch.no_grad():
                sampled = torch.multinomial(F.softmax(logits.detach(), dim=-1), 1).flatten()
            return F.cross_entropy(logits, sampled, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch: Any):
            return batch["attention_mask"]

    pad = getattr(inputs.tokenizer, "pad_token_id", None) or 0
    train_set = _Rows(padded(inputs.train_examples, pad))
    query_set = _Rows(padded(inputs.validation_examples, pad))
    task = ClassificationTask()
    started = time.perf_counter()
    model = prepare_model(model, task)
    analyzer = Analyzer(
        analysis_name=f"bench_{strategy}",
        model=model,
        task=task,
        cpu=True,
        log_level=logging.WARNING,
        disable_tqdm=True,
        output_dir=str(workdir),
    )
    factor_args = FactorArguments(strategy=strategy)
    analyzer.fit_all_factors(
        factors_name=strategy,
        dataset=train_set,
        per_device_batch_size=batch_size,
        factor_args=factor_args,
        overwrite_output_dir=True,
    )
    analyzer.compute_pairwise_scores(
        scores_name=f"{strategy}_scores",
        factors_name=strategy,
        query_dataset=query_set,
        train_dataset=train_set,
        per_device_query_batch_size=len(query_set),
        per_device_train_batch_size=batch_size,
        score_args=ScoreArguments(),
        overwrite_output_dir=True,
    )
    seconds = time.perf_counter() - started
    pairwise = analyzer.load_pairwise_scores(f"{strategy}_scores")["all_modules"]  # m x n
    return {"scores": -pairwise.double().mean(0).numpy(), "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# dattri
# ---------------------------------------------------------------------------------------------


def run_dattri(
    inputs: textbench.TextInputs, regularization: float, batch_size: int
) -> dict[str, Any]:
    """dattri's IFAttributorDataInf (train x query scores); mean over queries, negated.

    dattri vmaps ``torch.func.grad`` over samples; under vmap each sample gets a 4-D additive
    float attention mask (transformers' 2-D mask path is data-dependent and fails under vmap).
    """
    from dattri.algorithm.influence_function import IFAttributorDataInf
    from dattri.task import AttributionTask

    from datainf_core.models import load_adapted_model

    model = load_adapted_model(inputs.project, device="cpu", is_trainable=True)
    model.eval()
    # SDPA has no vmap batching rule (torch falls back to a per-sample loop): eager attention.
    model.set_attn_implementation("eager")
    pad = getattr(inputs.tokenizer, "pad_token_id", None) or 0
    train = padded(inputs.train_examples, pad)
    query = padded(inputs.validation_examples, pad)

    def loss_func(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...]) -> torch.Tensor:
        input_ids, attention_mask, label = data  # one sample: (T,), (T,), ()
        length = input_ids.shape[-1]
        additive = (1.0 - attention_mask.float()) * torch.finfo(torch.float32).min
        mask = additive.reshape(1, 1, 1, length).expand(1, 1, length, length)
        logits = torch.func.functional_call(
            model, params, (), {"input_ids": input_ids.reshape(1, length), "attention_mask": mask}
        ).logits
        return F.cross_entropy(logits, label.reshape(1))

    def loader(batch: dict[str, torch.Tensor], size: int) -> torch.utils.data.DataLoader:
        data = torch.utils.data.TensorDataset(
            batch["input_ids"], batch["attention_mask"], batch["labels"]
        )
        return torch.utils.data.DataLoader(data, batch_size=size, shuffle=False)

    started = time.perf_counter()
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}

    def load_adapter(target: nn.Module, checkpoint: dict[str, torch.Tensor]) -> nn.Module:
        target.load_state_dict(checkpoint, strict=False)  # adapter tensors only
        return target

    task = AttributionTask(
        loss_func=loss_func, model=model, checkpoints=params, checkpoints_load_func=load_adapter
    )
    attributor = IFAttributorDataInf(
        task=task, layer_name=list(params), device="cpu", regularization=regularization
    )
    # dattri recomputes the query gradients and their DataInf transform (over all n cached
    # training gradients) for every (train batch, query batch) pair: large batches keep that
    # to a few passes; vmap memory grows with the batch (~12 MB per sample here).
    train_batch = min(len(train["labels"]), 4 * batch_size)
    query_batch = len(query["labels"])
    attributor.cache(loader(train, train_batch))
    scores = attributor.attribute(loader(train, train_batch), loader(query, query_batch))  # n x m
    seconds = time.perf_counter() - started
    return {"scores": -scores.detach().double().mean(1).numpy(), "seconds": seconds}


# ---------------------------------------------------------------------------------------------


def _attempt(label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as error:  # a peer failing is a result to report, not a crash
        logger.exception("%s failed", label)
        return {"error": f"{type(error).__name__}: {str(error)[:200]}"}


def curve_points(signal: np.ndarray, is_noisy: np.ndarray, points: int = 21) -> dict[str, list]:
    """The detection curve (share of flipped labels found vs share inspected) at ``points``."""
    from datainf_core.evaluate import detection_curve

    curve = detection_curve(signal, is_noisy)
    grid = np.linspace(0.0, 1.0, points)
    found = np.interp(grid, curve["fraction_inspected"], curve["fraction_found"])
    return {"fraction_inspected": grid.round(3).tolist(), "fraction_found": found.round(4).tolist()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip", nargs="*", default=[], help="kronfluence, dattri")
    parser.add_argument(
        "--project",
        type=Path,
        default=None,
        help="an existing text-demo project (default: the cached small demo, rank 8)",
    )
    args = parser.parse_args(argv)
    textbench.quiet()
    torch.manual_seed(args.seed)
    from datainf_core.evaluate import detection_auc

    if args.project is not None:
        from datainf_core.project import load_project

        project, info = load_project(args.project), {"cached": True}
    else:
        project, info = textbench.text_project(
            args.size, seed=args.seed, rank=8, max_epochs=args.max_epochs
        )
    inputs = textbench.load_inputs(project)
    is_noisy = inputs.train_df["is_noisy"].to_numpy(dtype=bool)
    ours = run_ours(inputs, ["datainf", "hessian_free", "exact"])
    lam = relative_lambda(ours["_grads"]["train"])
    # The same formula with dattri's damping (one absolute λ for every block): a fidelity check.
    from datainf_core.influence import compute_influence

    started = time.perf_counter()
    absolute = compute_influence(
        ours["_grads"]["train"],
        ours["_grads"]["query"],
        method="datainf",
        damping=lam,
        damping_mode="absolute",
        aggregate="mean",
    )
    ours["datainf_absolute"] = {
        "scores": absolute.double().numpy(),
        "seconds": ours["_grads"]["seconds"] + time.perf_counter() - started,
    }
    results: list[tuple[str, str, str, dict[str, Any]]] = [
        ("DataInf Studio", "datainf", "datainf", ours["datainf"]),
        ("DataInf Studio", "hessian_free (identity)", "hessian_free", ours["hessian_free"]),
        ("DataInf Studio", "exact", "exact", ours["exact"]),
        (
            "DataInf Studio",
            f"datainf (absolute λ {lam:.2e}, as given to dattri)",
            "datainf_absolute",
            ours["datainf_absolute"],
        ),
    ]

    def write(pending: list[str]) -> Path:
        """Writes peers.json with the rows so far (a timeout keeps what finished)."""
        rows = []
        curves: dict[str, dict[str, list]] = {}
        for tool, method, match, res in results:
            row: dict[str, Any] = {
                "tool": tool,
                "version": _version({"DataInf Studio": "datainf-studio"}.get(tool, tool)),
                "method": method,
            }
            if "error" in res:
                row.update(seconds=None, auc=None, pearson_vs_ours=None, error=res["error"])
            else:
                row["seconds"] = res["seconds"]
                row["auc"] = detection_auc(res["scores"], is_noisy)
                row["pearson_vs_ours"] = float(
                    np.corrcoef(res["scores"], ours[match]["scores"])[0, 1]
                )
                row["compared_with"] = f"ours {match}"
                curves[f"{tool}: {method.split(' (')[0]}"] = curve_points(res["scores"], is_noisy)
            rows.append(row)
        rows.append(
            {
                "tool": "baseline",
                "method": "training loss",
                "seconds": ours["_grads"]["seconds"],
                "auc": detection_auc(ours["_grads"]["losses"].double().numpy(), is_noisy),
            }
        )
        curves["training loss"] = curve_points(ours["_grads"]["losses"].double().numpy(), is_noisy)
        ok = [r for r in rows if r.get("auc") is not None]
        best = max(ok, key=lambda r: r["auc"])
        fastest = min((r for r in ok if r["tool"] != "baseline"), key=lambda r: r["seconds"])
        summary = (
            f"n = {len(inputs.train_examples)} training samples ({int(is_noisy.sum())} flipped), "
            f"m = {len(inputs.validation_examples)} validation queries, MiniLM + LoRA. "
            f"Highest AUC: {best['tool']} {best['method']} ({best['auc']:.3f}); fastest influence "
            f"method: {fastest['tool']} {fastest['method']} ({fastest['seconds']:.1f} s). Seconds "
            "include each tool's own gradient computation (ours: per-sample gradients of train and "
            "validation once, then the method). dattri gets this engine's mean relative λ as its "
            "absolute regularization and eager attention (SDPA has no vmap rule); kronfluence runs "
            "with its defaults (true Fisher, heuristic damping)."
            + (
                f" Not finished when this file was written: {', '.join(pending)}."
                if pending
                else ""
            )
        )
        result = {
            "summary": summary,
            "rows": rows,
            "detection_curve": curves,
            "settings": {
                "project": str(args.project or project.root),
                "size": len(inputs.train_examples),
                "seed": args.seed,
                "lora_rank": getattr(inputs.model, "peft_config", {}).get("default").r
                if hasattr(inputs.model, "peft_config")
                else None,
                "batch_size": args.batch_size,
                "adapter_cached": info.get("cached"),
                "val_accuracy": info.get("val_accuracy"),
                "threads": torch.get_num_threads(),
            },
        }
        path = textbench.write_result("peers", result)
        logger.info("wrote %s (%d rows)", path, len(rows))
        return path

    peers = []
    if "dattri" not in args.skip:
        peers.append("dattri datainf")
    if "kronfluence" not in args.skip:
        peers += ["kronfluence identity", "kronfluence ekfac"]
    write(peers)
    if "dattri" in args.skip:
        res = {"error": "skipped (--skip)"}
    elif _version("dattri") is None:
        res = {"error": "not installed (bench/requirements-bench.txt)"}
    else:
        res = _attempt("dattri", lambda: run_dattri(inputs, lam, args.batch_size))
    results.append(("dattri", f"datainf (regularization {lam:.2e})", "datainf_absolute", res))
    peers = [p for p in peers if not p.startswith("dattri")]
    write(peers)
    with tempfile.TemporaryDirectory() as tmp:
        for strategy, match in (("identity", "hessian_free"), ("ekfac", "exact")):
            if "kronfluence" in args.skip:
                res = {"error": "skipped (--skip)"}
            elif _version("kronfluence") is None:
                res = {"error": "not installed (bench/requirements-bench.txt)"}
            else:
                res = _attempt(
                    f"kronfluence {strategy}",
                    lambda s=strategy: run_kronfluence(inputs, s, Path(tmp), args.batch_size),
                )
            results.append(("kronfluence", strategy, match, res))
            peers = [p for p in peers if p != f"kronfluence {strategy}"]
            path = write(peers)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
