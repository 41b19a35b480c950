"""Fidelity to Exact across LoRA ranks: the paper's Figure 1 at CPU scale.

For each rank r in {1, 2, 4, 8} a MiniLM LoRA adapter is trained on a small text demo (cached
under .cache/bench/), per-sample gradients of the training and validation samples are collected,
and every method's aggregate scores (against the mean validation gradient) are correlated with the
Exact method's (the damped per-block Hessian inverted explicitly). Pearson (the paper's measure)
with a bootstrap 95% interval over training samples, Spearman, each method's time, and its
mislabel-detection AUC. Writes bench/results/fidelity.json.

    .venv/bin/python bench/bench_fidelity.py [--size 600] [--ranks 1 2 4 8]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))

import textbench  # noqa: E402

logger = logging.getLogger("bench_fidelity")

# Figure 1 of the DataInf paper (RoBERTa-large LoRA on GLUE-MRPC, r = 1), read from the text.
PAPER_R1 = {"datainf": 0.64, "hessian_free": 0.50, "lissa": 0.45}


def bootstrap_pearson(
    x: np.ndarray, y: np.ndarray, *, resamples: int = 300, seed: int = 0
) -> tuple[float, float]:
    """2.5% and 97.5% percentiles of Pearson's r over bootstrap resamples of the samples."""
    rng = np.random.default_rng(seed)
    n = len(x)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        xs, ys = x[idx], y[idx]
        if xs.std() == 0 or ys.std() == 0:
            continue
        values.append(float(np.corrcoef(xs, ys)[0, 1]))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def measure_rank(rank: int, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict]:
    """Trains (or reuses) the rank-``rank`` adapter and correlates every method with Exact."""
    from datainf_core.evaluate import detection_auc
    from datainf_core.influence import METHODS, compute_influence

    project, info = textbench.text_project(
        args.size, seed=args.seed, rank=rank, max_epochs=args.max_epochs
    )
    inputs = textbench.load_inputs(project)
    grads = textbench.collect(inputs, cache=not args.no_cache)
    is_noisy = inputs.train_df["is_noisy"].to_numpy(dtype=bool)
    dims = sum(g.shape[1] for g in grads["train"].values())
    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for method in METHODS:
        started = time.perf_counter()
        extra_args = {}
        if method == "lissa" and args.lissa_iterations is not None:
            extra_args["lissa_iterations"] = args.lissa_iterations
        result = compute_influence(
            grads["train"],
            grads["query"],
            method=method,
            damping=args.damping,
            aggregate="mean",
            **extra_args,
        )
        seconds[method] = time.perf_counter() - started
        scores[method] = result.double().cpu().numpy()
    exact = scores["exact"]
    rows = []
    for method in METHODS:
        row: dict[str, Any] = {"rank": rank, "method": method}
        if method != "exact":
            low, high = bootstrap_pearson(scores[method], exact, seed=args.seed)
            row["pearson"] = float(np.corrcoef(scores[method], exact)[0, 1])
            row["pearson_ci95"] = [round(low, 3), round(high, 3)]
            row["spearman"] = float(stats.spearmanr(scores[method], exact).statistic)
        row["detection_auc"] = detection_auc(scores[method], is_noisy)
        row["seconds"] = seconds[method]
        rows.append(row)
    extra = {
        "rank": rank,
        "n_train": len(inputs.train_examples),
        "n_query": len(inputs.validation_examples),
        "adapter_dims": dims,
        "blocks": len(grads["train"]),
        "gradient_seconds": grads["seconds"],
        "gradients_cached": grads["cached"],
        "val_accuracy": info.get("val_accuracy"),
        "best_epoch": info.get("best_epoch"),
        "train_seconds": info.get("train_seconds"),
        "adapter_cached": info.get("cached"),
        "train_loss_auc": detection_auc(grads["losses"].double().numpy(), is_noisy),
    }
    logger.info(
        "rank %d: %s",
        rank,
        ", ".join(f"{r['method']} {r.get('pearson', 1.0):.3f}" for r in rows),
    )
    return rows, extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=600, help="training samples of the demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument(
        "--no-cache", action="store_true", help="recollect gradients even when cached"
    )
    parser.add_argument(
        "--warm-only",
        action="store_true",
        help="only train the adapters and cache their gradients (no scores, no result file)",
    )
    parser.add_argument(
        "--lissa-iterations", type=int, default=None, help="engine default if unset"
    )
    args = parser.parse_args(argv)
    textbench.quiet()
    import torch

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    per_rank: list[dict[str, Any]] = []
    if args.warm_only:
        for rank in args.ranks:
            project, _ = textbench.text_project(
                args.size, seed=args.seed, rank=rank, max_epochs=args.max_epochs
            )
            textbench.collect(textbench.load_inputs(project), cache=True)
        return 0
    for rank in args.ranks:
        rank_rows, extra = measure_rank(rank, args)
        rows += rank_rows
        per_rank.append(extra)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "exact"]
    table = [
        {
            "rank": rank,
            **{
                m: r["pearson"]
                for r in rows
                for m in methods
                if r["rank"] == rank and r["method"] == m
            },
        }
        for rank in args.ranks
    ]
    table.append({"rank": "paper, r=1 (RoBERTa-large, MRPC)", **PAPER_R1})
    best = {
        rank: max(
            methods,
            key=lambda m, rank=rank: next(
                r["pearson"] for r in rows if r["rank"] == rank and r["method"] == m
            ),
        )
        for rank in args.ranks
    }
    summary = (
        f"Pearson correlation with Exact (aggregate scores, n = {per_rank[0]['n_train']} training "
        f"samples, m = {per_rank[0]['n_query']} validation queries, damping {args.damping} "
        "relative). Highest per rank: "
        + ", ".join(f"r={rank}: {method}" for rank, method in best.items())
        + ". Intervals in `rows` are bootstrap 95% over training samples."
    )
    result = {
        "summary": summary,
        "settings": {
            "size": args.size,
            "noise": 0.2,
            "seed": args.seed,
            "ranks": args.ranks,
            "alpha": "2 x rank",
            "max_epochs": args.max_epochs,
            "damping": args.damping,
            "lissa_iterations": args.lissa_iterations or "engine default",
            "model": "all-MiniLM-L6-v2, LoRA on query,value + classifier head",
        },
        "table": table,
        "paper_r1": PAPER_R1,
        "rows": rows,
        "per_rank": per_rank,
        "seconds": time.perf_counter() - started,
    }
    path = textbench.write_result("fidelity", result)
    print(summary)
    for line in table:
        print(
            " | ".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()
            )
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
