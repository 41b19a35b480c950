"""A whole run with 1 vs 2 processes, and what a random projection does on the real text demo.

    .venv/bin/python bench/bench_scaleout.py            # n = 512 train rows, 2 repeats (~5 min)
    .venv/bin/python bench/bench_scaleout.py --quick    # n = 256, 1 repeat

1. ``datainf run DIR --nproc N`` for N = 1 and 2 on a tiny random BERT classifier (2 layers, 32
   wide, LoRA r = 4) from tests/fixtures.py, each from an empty gradient store: wall time of the
   whole command (process start, model load, per-sample gradients, DataInf and self-influence
   scores, signals) and rank 0's stage timings (timings.json), then the 1-process / 2-process
   ratios. With the default 256-row shards, 512 rows make one shard per rank. The spawned ranks
   use ``cpu_count // N`` torch threads each; one process runs with the default threads and
   with one thread (OMP_NUM_THREADS=1).
2. Spearman rank correlation of DataInf scores on projected vs unprojected gradients, on the text
   demo's cached gradients (demo-projects/text/gradients; skipped when absent), for projection
   widths 256, 1,024 and 4,096 per block, plus the detection AUC of each against ``is_noisy``.
   The demo's blocks are 3,072 wide, so 4,096 leaves them unchanged (a check, correlation 1).

Prints markdown tables and writes bench/results/scaleout.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DEMO = REPO / "demo-projects" / "text"
sys.path.insert(0, str(REPO / "tests"))  # fixtures.py: the tiny offline projects


CONFIGS = {"1 process": (1, None), "1 process, 1 thread": (1, 1), "2 processes": (2, None)}


def run_once(root: Path, config: str, run_id: str) -> dict[str, Any]:
    """One ``datainf run`` from an empty gradient store; wall seconds and rank 0's stages."""
    nproc, threads = CONFIGS[config]
    shutil.rmtree(root / "gradients", ignore_errors=True)
    argv = [sys.executable, "-m", "datainf_core", "run", str(root), "--run-id", run_id]
    argv += ["--method", "datainf", "--no-train-loss", "--no-progress", "--nproc", str(nproc)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, cwd=str(REPO))
    wall = time.perf_counter() - started
    timings = json.loads((root / "runs" / run_id / "timings.json").read_text())
    return {"config": config, "wall_s": round(wall, 2), "stages_s": timings}


def processes(n: int, repeats: int) -> dict[str, Any]:
    """Part 1: the runs, the best of ``repeats`` per process count, and the ratios."""
    import pandas as pd
    from fixtures import make_tiny_classification_project

    folder = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    try:
        project = make_tiny_classification_project(folder, n_train=n, noise=0.2, n_validation=64)
        runs = [
            run_once(project.root, config, f"c{index}-r{repeat}")
            for repeat in range(repeats)
            for index, config in enumerate(CONFIGS)
        ]
        scores = [
            pd.read_parquet(project.root / "runs" / f"c{index}-r0" / "signals.parquet")
            for index in (0, 2)
        ]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    best = {
        c: min((r for r in runs if r["config"] == c), key=lambda r: r["wall_s"]) for c in CONFIGS
    }
    two = best["2 processes"]
    ratios: dict[str, dict[str, float]] = {}
    for config in ("1 process", "1 process, 1 thread"):
        one = best[config]
        ratios[config] = {"wall": round(one["wall_s"] / two["wall_s"], 2)}
        for stage, seconds in one["stages_s"].items():
            if two["stages_s"].get(stage, 0) > 0:
                ratios[config][stage] = round(seconds / two["stages_s"][stage], 2)
    worst = 0.0
    for column in ("datainf", "self_influence"):
        one, two = scores[0][column].to_numpy(), scores[1][column].to_numpy()
        worst = max(worst, float(abs(one - two).max() / abs(one).max()))
    return {"n": n, "m": 64, "runs": runs, "best": best, "ratios": ratios, "max_rel_diff": worst}


def projection_on_demo(dims: tuple[int, ...]) -> list[dict[str, Any]] | None:
    """Part 2: DataInf on projected vs unprojected demo gradients (None without the demo)."""
    import pandas as pd
    from scipy.stats import spearmanr

    from datainf_core.evaluate import detection_auc
    from datainf_core.influence import compute_influence
    from datainf_core.projection import make_projection
    from datainf_core.store import GradientStore

    folders = {s: DEMO / "gradients" / s for s in ("train", "validation")}
    if not all(f.is_dir() and any(f.iterdir()) for f in folders.values()):
        return None
    train, query = (GradientStore.open(next(folders[s].iterdir())) for s in folders)
    truth = pd.read_csv(DEMO / "train.csv")["is_noisy"].to_numpy()[: train.n]
    started = time.perf_counter()
    full = compute_influence(train, query).double().numpy()  # n
    rows = [
        {
            "dim": "none",
            "spearman": 1.0,
            "auc": round(detection_auc(full, truth), 4),
            "seconds": round(time.perf_counter() - started, 2),
        }
    ]
    for dim in dims:
        projection = make_projection(train, dim=dim, seed=0)
        started = time.perf_counter()
        scores = compute_influence(projection.apply(train), projection.apply(query))
        scores = scores.double().numpy()
        rows.append(
            {
                "dim": dim,
                "spearman": round(float(spearmanr(full, scores).statistic), 4),
                "auc": round(detection_auc(scores, truth), 4),
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 256, one repeat")
    parser.add_argument("--no-projection", action="store_true", help="skip part 2")
    args = parser.parse_args()
    n, repeats = (256, 1) if args.quick else (512, 2)

    part1 = processes(n, repeats)
    print(f"## 1 vs 2 processes: whole run, n = {n}, m = 64, {os.cpu_count()} cores\n")
    names = list(part1["best"]["1 process"]["stages_s"])
    print("| run | wall s | " + " | ".join(f"{name} s" for name in names) + " |")
    print("|---" * (2 + len(names)) + "|")
    for config, best in part1["best"].items():
        stages = " | ".join(f"{best['stages_s'].get(name, 0):.2f}" for name in names)
        print(f"| {config} | {best['wall_s']:.2f} | {stages} |")
    print("\n1-process time / 2-process time (> 1: two processes faster):")
    for config, ratios in part1["ratios"].items():
        print(f"- {config}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"largest relative score difference, 1 vs 2 processes: {part1['max_rel_diff']:.2e}\n")

    part2 = None if args.no_projection else projection_on_demo((256, 1024, 4096))
    if part2 is None:
        print("text demo gradients not found (or skipped): no projection figures")
    else:
        print("## Random projection on the text demo (n = 2,000, 24 blocks of 3,072 + head)\n")
        print("| dim per block | Spearman vs unprojected | detection AUC | seconds |")
        print("|---|---|---|---|")
        for row in part2:
            print(f"| {row['dim']} | {row['spearman']:.4f} | {row['auc']:.4f} | {row['seconds']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"processes": part1, "projection": part2, "cores": os.cpu_count(), "quick": args.quick}
    (RESULTS / "scaleout.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'scaleout.json'}")


if __name__ == "__main__":
    main()
