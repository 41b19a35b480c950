"""Identification table (the paper's Table 2 protocol) on the generation and image demos.

For each seed the demo is built (cached under --work), per-sample gradients of the training and
test samples are collected, and every influence method (plain and cosine / unit-norm) scores
every (test, train) pair. Per test sample: ROC-AUC of "same category" against the negated score
and recall of same-category samples in the top k (k = training samples per category); the table
gives the mean over test samples, then mean ± std (and min..max) over seeds.

    .venv/bin/python bench/bench_identification.py --task image --seeds 0 1 2
    .venv/bin/python bench/bench_identification.py --task generation --seeds 0 1 2

Results go to bench/results/identification.json (merged with what is there: rerunning one task or
seed keeps the others). Generation is measured with the prompt loss (the demo's default, the
paper's setting) and the response loss; images with noise draws shared by every sample (the
default) and, with ``--diffusion-noise shared per_sample``, with each sample's own draws.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench_identification")
SIZE_ARGS = ("train_per_class", "test_per_class", "epochs")


def _categories(df: Any, column: str) -> np.ndarray:
    return df[column].astype(str).to_numpy()


def _gradients_generation(
    project: Any, loss_tokens: str
) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    from datainf_core import data, gradients, models

    tokenizer = models.load_tokenizer(project)
    model = models.load_adapted_model(project, device="cpu", is_trainable=True)
    train_df = data.load_split(project, "train")
    test_df = data.load_split(project, "validation")
    common = {"task": "generation", "batch_size": 8, "device": "cpu"}
    train = gradients.collect_gradients(
        model, data.build_examples(project, train_df, tokenizer, loss_tokens=loss_tokens), **common
    )
    query = gradients.collect_gradients(
        model, data.build_examples(project, test_df, tokenizer, loss_tokens=loss_tokens), **common
    )
    column = project.data.category_column
    return train, query, _categories(train_df, column), _categories(test_df, column)


def _gradients_image(project: Any, noise: str) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    from datainf_core import data, diffusion, gradients

    bundle = diffusion.load_diffusion(project, device="cpu")
    settings = gradients.DiffusionLossSettings(
        noise_scheduler=bundle.noise_scheduler,
        vae=bundle.vae,
        timesteps=tuple(diffusion.default_timesteps(bundle.noise_scheduler)),
        noise=noise,
    )
    train_df = data.load_split(project, "train")
    test_df = data.load_split(project, "validation")
    common = {"task": "text-to-image", "batch_size": 16, "device": "cpu", "diffusion": settings}
    train = gradients.collect_gradients(
        bundle.unet, diffusion.build_image_examples(project, train_df, bundle), **common
    )
    query = gradients.collect_gradients(
        bundle.unet, diffusion.build_image_examples(project, test_df, bundle), **common
    )
    column = project.data.category_column
    return train, query, _categories(train_df, column), _categories(test_df, column)


def score_all(
    train: dict, query: dict, train_cat: np.ndarray, query_cat: np.ndarray, methods: list[str]
) -> dict[str, dict[str, float]]:
    """Identification metrics of every method and its cosine variant."""
    from datainf_core.evaluate import identification_metrics
    from datainf_core.influence import compute_influence

    out = {}
    for method in methods:
        for unit_norm in (False, True):
            name = method + ("_cosine" if unit_norm else "")
            began = time.perf_counter()
            scores = compute_influence(
                train, query, method=method, aggregate=None, unit_norm=unit_norm
            )  # m x n
            metrics = identification_metrics(scores, train_cat, query_cat)
            metrics["seconds"] = round(time.perf_counter() - began, 2)
            out[name] = {k: float(v) for k, v in metrics.items()}
            logger.info(
                "%s: AUC %.3f ± %.3f, recall %.3f (%.1f s)",
                name,
                metrics["auc_mean"],
                metrics["auc_std"],
                metrics["recall_mean"],
                metrics["seconds"],
            )
    return out


def build(task: str, seed: int, work: Path, args: argparse.Namespace) -> tuple[Any, float]:
    """Builds (or loads) one demo; sizes other than the demo's defaults get their own folder."""
    began = time.perf_counter()
    sizes: dict[str, int] = {}
    if args.train_per_class is not None:
        key = "train_per_class" if task == "generation" else "train_per_style"
        sizes[key] = args.train_per_class
    if args.test_per_class is not None:
        key = "test_per_class" if task == "generation" else "test_per_style"
        sizes[key] = args.test_per_class
    if args.epochs is not None:
        sizes["epochs"] = args.epochs
    suffix = "".join(f"-{k.split('_')[0]}{v}" for k, v in sorted(sizes.items()))
    folder = work / f"{task}-seed{seed}{suffix}"
    if task == "generation":
        from datainf_core.demos.generation import build_generation_demo

        project = build_generation_demo(folder, seed=seed, **sizes)
    else:
        from datainf_core.demos.image import build_image_demo

        project = build_image_demo(folder, seed=seed, **sizes)
    return project, time.perf_counter() - began


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Mean ± std and min..max over seeds of each (task, setting, method)."""
    table: dict[str, Any] = {}
    for key, per_seed in results["runs"].items():
        task, setting = key.split("/")
        methods = sorted({m for run in per_seed.values() for m in run["methods"]})
        for method in methods:
            aucs = [
                r["methods"][method]["auc_mean"]
                for r in per_seed.values()
                if method in r["methods"]
            ]
            recalls = [
                r["methods"][method]["recall_mean"]
                for r in per_seed.values()
                if method in r["methods"]
            ]
            table[f"{task}/{setting}/{method}"] = {
                "seeds": len(aucs),
                "auc_mean": float(np.mean(aucs)),
                "auc_std": float(np.std(aucs)),
                "auc_min": float(np.min(aucs)),
                "auc_max": float(np.max(aucs)),
                "recall_mean": float(np.mean(recalls)),
                "recall_std": float(np.std(recalls)),
            }
    return table


def print_table(table: dict[str, Any]) -> None:
    print(
        f"{'task/setting/method':<44} {'seeds':>5} {'AUC mean ± std':>16} {'min..max':>13} {'recall':>14}"
    )
    for key, row in table.items():
        print(
            f"{key:<44} {row['seeds']:>5} {row['auc_mean']:>8.3f} ± {row['auc_std']:.3f} "
            f"{row['auc_min']:.3f}..{row['auc_max']:.3f} {row['recall_mean']:>7.3f} ± {row['recall_std']:.3f}"
        )


def main() -> None:
    from datainf_core.influence import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--task", choices=["generation", "image"], nargs="+", default=["image", "generation"]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    # LiSSA last: its 1,000 iterations per block take longest.
    order = sorted(METHODS, key=lambda m: m == "lissa")
    parser.add_argument("--methods", nargs="+", default=order)
    parser.add_argument("--loss-tokens", nargs="+", default=["prompt", "response"])
    parser.add_argument(
        "--diffusion-noise",
        nargs="+",
        choices=["shared", "per_sample"],
        default=["shared"],
        help="image: noise draws shared by all samples (the default) and/or each sample's own",
    )
    parser.add_argument("--train-per-class", type=int, help="smaller demo (default: the demo's)")
    parser.add_argument("--test-per-class", type=int, help="smaller demo (default: the demo's)")
    parser.add_argument("--epochs", type=int, help="LoRA epochs (default: the demo's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a busy CPU)")
    parser.add_argument("--tag", default="", help="suffix of the result keys, e.g. -small")
    parser.add_argument("--work", type=Path, default=ROOT / "demo-projects" / "identification")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "identification.json"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="only merge these result files (from parallel runs) into --out and print the table",
    )
    args = parser.parse_args()
    if args.merge:
        merged: dict[str, Any] = {"runs": {}}
        for path in [args.out, *args.merge]:
            if path.exists():
                for key, seeds in json.loads(path.read_text()).get("runs", {}).items():
                    for seed, run in seeds.items():  # methods of one seed from several files
                        kept = merged["runs"].setdefault(key, {}).setdefault(seed, {})
                        methods = {**kept.get("methods", {}), **run.get("methods", {})}
                        built = max(kept.get("build_seconds", 0.0), run.get("build_seconds", 0.0))
                        kept.update(
                            run, methods=methods, build_seconds=built
                        )  # a reused build ~0 s
        merged["table"] = summarise(merged)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(merged, indent=2))
        print_table(merged["table"])
        print(f"wrote {args.out}")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"runs": {}}
    if args.out.exists():
        results = json.loads(args.out.read_text())
        results.setdefault("runs", {})
    for task in args.task:
        for seed in args.seeds:
            project, build_seconds = build(task, seed, args.work, args)
            # (result key, loss tokens or diffusion noise): images are "denoising" with shared
            # noise draws (the default) and "denoising-per_sample" with each sample's own.
            settings = (
                [(tokens, tokens) for tokens in args.loss_tokens]
                if task == "generation"
                else [
                    ("denoising" if noise == "shared" else f"denoising-{noise}", noise)
                    for noise in args.diffusion_noise
                ]
            )
            for setting, choice in settings:
                began = time.perf_counter()
                if task == "generation":
                    train, query, train_cat, query_cat = _gradients_generation(project, choice)
                else:
                    train, query, train_cat, query_cat = _gradients_image(project, choice)
                grad_seconds = time.perf_counter() - began
                methods = score_all(train, query, train_cat, query_cat, args.methods)
                del train, query
                results["runs"].setdefault(f"{task}{args.tag}/{setting}", {})[str(seed)] = {
                    "build_seconds": round(build_seconds, 1),
                    "gradient_seconds": round(grad_seconds, 1),
                    "n_train": int(train_cat.size),
                    "n_test": int(query_cat.size),
                    "sizes": {k: v for k, v in vars(args).items() if k in SIZE_ARGS},
                    "methods": methods,
                }
                results["table"] = summarise(results)
                args.out.write_text(json.dumps(results, indent=2))
                build_seconds = 0.0  # counted once per seed
    print_table(results["table"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
