"""Influence engine vs the plain per-sample loop of the published DataInf code, and vs the floor.

    .venv/bin/python bench/bench_engine.py            # n = 1,000 and 10,000 (~1-2 minutes)
    .venv/bin/python bench/bench_engine.py --quick    # n = 1,000 only

Random gradients of 24 blocks of 8 x 384 (LoRA r = 8 on a 384-wide model); 1 or 32 query samples.
Modes: ``aggregate`` scores every training sample against the mean query gradient (n,);
``per-query`` gives the (m, n) matrix. The plain engine (bench/plain_engine.py) loops in Python
over samples and blocks; it is timed on at most ``--plain-samples`` training samples and one
query, then scaled linearly (its cost is exactly linear in n x m), which the table marks.

Floor: bytes of training gradients read once ÷ the machine's copy bandwidth (torch ``copy_`` of a
256 MiB buffer, source bytes per second). Peak memory: the highest RSS seen during the call minus
the RSS before it (sampled every 2 ms). Goal on a 2-core CPU: ≥ 10x the plain engine and ≤ 2x the
floor in aggregate mode; ≥ 100x in per-query mode with 32 query samples. Prints a markdown table and
writes bench/results/engine.json. Both engines run with ``--threads`` torch threads (default 1,
since the CPU is shared and oversubscribed OpenMP threads slowed the products up to 7x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plain_engine import per_sample_dicts, plain_datainf  # noqa: E402

from datainf_core.influence import compute_influence  # noqa: E402

BLOCKS, BLOCK_DIM = 24, 8 * 384
RESULTS = Path(__file__).resolve().parent / "results"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Highest RSS above the starting RSS while the ``with`` body runs (sampled every 2 ms)."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def copy_bandwidth() -> float:
    """Bytes per second that ``copy_`` moves from a 256 MiB source (best of 5)."""
    src = torch.randn(64 << 20)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return src.numel() * 4 / best


def make_grads(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"layer{i // 2}.{'lora_A' if i % 2 == 0 else 'lora_B'}": torch.randn(
            n, BLOCK_DIM, generator=gen
        )
        for i in range(BLOCKS)
    }


def best_time(fn: Any, repeats: int) -> tuple[float, Any, float]:
    """(best seconds, last result, peak extra RSS MiB over the runs)."""
    best, result, peak = float("inf"), None, 0.0
    for _ in range(repeats):
        with PeakRss() as mem:
            start = time.perf_counter()
            result = fn()
            best = min(best, time.perf_counter() - start)
        peak = max(peak, mem.extra_mib)
    return best, result, peak


def time_plain(train: dict[str, torch.Tensor], query: dict[str, torch.Tensor], limit: int) -> float:
    """Seconds of the plain engine for all n samples and ONE query (scaled from ``limit`` rows)."""
    n = next(iter(train.values())).shape[0]
    rows = min(n, limit)
    subset = per_sample_dicts({k: v[:rows] for k, v in train.items()})
    one = {k: v[0] for k, v in query.items()}
    start = time.perf_counter()
    plain_datainf(subset, one)
    return (time.perf_counter() - start) * n / rows


def bench_size(n: int, bandwidth: float, plain_limit: int, repeats: int) -> list[dict[str, Any]]:
    train, query = make_grads(n, 0), make_grads(32, 1)
    train_bytes = n * BLOCKS * BLOCK_DIM * 4
    floor = train_bytes / bandwidth
    plain_one = time_plain(train, query, plain_limit)
    scaled = "" if n <= plain_limit else f" (timed on {plain_limit:,} samples, scaled)"
    rows = []
    cases = [
        ("aggregate", 1, "mean"),
        ("aggregate", 32, "mean"),
        ("per-query", 32, None),
    ]
    for mode, m, aggregate in cases:
        q = {k: v[:m] for k, v in query.items()}
        seconds, scores, peak = best_time(
            lambda q=q, aggregate=aggregate: compute_influence(train, q, aggregate=aggregate),
            repeats,
        )
        # The plain engine scores one query gradient per run: the mean in aggregate mode, every
        # query sample in turn in per-query mode.
        plain = plain_one * (1 if aggregate == "mean" else m)
        rows.append(
            {
                "n": n,
                "mode": mode,
                "queries": m,
                "engine_s": round(seconds, 4),
                "plain_s": round(plain, 2),
                "plain_note": ("per-query: 1 query x 32" if aggregate is None else "") + scaled,
                "speedup": round(plain / seconds, 1),
                "floor_s": round(floor, 4),
                "engine_over_floor": round(seconds / floor, 2),
                "peak_extra_mib": round(peak, 1),
                "train_gib": round(train_bytes / 2**30, 3),
                "scores_finite": bool(torch.isfinite(scores).all()),
            }
        )
    if n <= plain_limit:  # the two engines agree (same formula, same λ)
        mean_query = {k: v.mean(dim=0) for k, v in query.items()}
        plain_scores = plain_datainf(per_sample_dicts(train), mean_query)
        ours = compute_influence(train, query)
        rel = float((ours - plain_scores).norm() / plain_scores.norm())
        for row in rows[:2]:
            row["rel_diff_vs_plain"] = f"{rel:.1e}"
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 1,000 only")
    parser.add_argument("--plain-samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs at n = 1,000")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both engines (default 1: on a shared 2-core machine, 2 OpenMP "
        "threads were up to 7x slower; 0 keeps torch's default)",
    )
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bandwidth = copy_bandwidth()
    rows = []
    for n in (1000,) if args.quick else (1000, 10_000):
        rows += bench_size(n, bandwidth, args.plain_samples, args.repeats if n <= 1000 else 1)
    columns = [
        "n",
        "mode",
        "queries",
        "engine_s",
        "plain_s",
        "speedup",
        "floor_s",
        "engine_over_floor",
        "peak_extra_mib",
        "plain_note",
    ]
    print(
        f"copy bandwidth: {bandwidth / 1e9:.2f} GB/s; torch threads: {torch.get_num_threads()}; "
        f"load average: {os.getloadavg()[0]:.1f}"
    )
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    result = {
        "summary": (
            f"DataInf engine on random gradients of {BLOCKS} blocks of 8 x 384, damping 0.1 "
            f"(relative: 3 passes over the train gradients in aggregate and per-query mode). "
            f"Copy bandwidth {bandwidth / 1e9:.2f} GB/s; floor = train bytes / bandwidth."
        ),
        "rows": rows,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
            "load_average_1min": round(os.getloadavg()[0], 1),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engine.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
