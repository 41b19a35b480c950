"""Engine memory as n grows, 1 vs 2 processes, and what a random projection does to the ranking.

    .venv/bin/python bench/bench_memory.py            # n = 10,000 vs 100,000 (~1-2 minutes)
    .venv/bin/python bench/bench_memory.py --quick    # n = 2,000 vs 20,000

1. Peak RSS of aggregate DataInf scoring for n and 10n synthetic training samples at a fixed width
   (4 blocks of 256), each size in its own subprocess. The gradients come from a lazy block that
   makes rows on slicing from a fixed pool of random tiles (every read of a row gives the same
   values), as the on-disk store would stream them: the RSS is the engine's, not the data's.
   Goal: growth ≤ 1.2x.
2. Wall time of the same scoring for the large n in 1 process vs 2 processes (gloo on 127.0.0.1,
   each rank its contiguous shard, 1 torch thread each), timed from a barrier to the last rank;
   the 1-process run with 1 and with the default number of torch threads.
3. Spearman rank correlation of DataInf scores on projected vs unprojected gradients (8 blocks of
   3,072 with low-rank structure plus noise, n = 2,000) for several projection widths.

Prints markdown tables and writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
BLOCKS, WIDTH, TILE, POOL = 4, 256, 1024, 4
BUDGET = 64 << 20


class SyntheticBlock:
    """A lazy (n, d) block whose rows are made on slicing from a fixed pool of random tiles.

    Row ``i`` is row ``i % TILE`` of pool tile ``(i // TILE) % POOL`` times ``1 + (i // TILE) % 7
    / 10``: the same values on every read, and a pool whose size does not depend on n.
    """

    def __init__(self, n: int, d: int, seed: int) -> None:
        self.shape = (n, d)
        gen = torch.Generator().manual_seed(seed)
        self._pool = torch.randn(POOL, TILE, d, generator=gen)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop = rows.start or 0, min(rows.stop, self.shape[0])
        pieces = []
        for tile in range(start // TILE, (stop - 1) // TILE + 1):
            lo, hi = max(start - tile * TILE, 0), min(stop - tile * TILE, TILE)
            pieces.append(self._pool[tile % POOL, lo:hi] * (1 + (tile % 7) / 10))
        return torch.cat(pieces)


class ShardBlock:
    """Rows ``offset:offset + n`` of another lazy block."""

    def __init__(self, block: SyntheticBlock, offset: int, n: int) -> None:
        self._block, self._offset = block, offset
        self.shape = (n, block.shape[1])

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop = rows.start or 0, min(rows.stop, self.shape[0])
        return self._block[slice(self._offset + start, self._offset + stop)]


def synthetic(n: int) -> tuple[dict[str, SyntheticBlock], dict[str, torch.Tensor]]:
    train = {f"block{b}": SyntheticBlock(n, WIDTH, b) for b in range(BLOCKS)}
    gen = torch.Generator().manual_seed(99)
    query = {f"block{b}": torch.randn(8, WIDTH, generator=gen) for b in range(BLOCKS)}
    return train, query


def peak_rss_child(n: int) -> dict[str, Any]:
    """Runs in a subprocess: aggregate scoring of n synthetic samples; reports peak RSS."""
    from datainf_core.influence import compute_influence

    train, query = synthetic(n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    scores = compute_influence(train, query, memory_budget_bytes=BUDGET)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "n": n,
        "peak_rss_mib": round(peak / 2**20, 1),
        "rss_before_mib": round(before / 2**20, 1),
        "seconds": round(seconds, 2),
        "finite": bool(torch.isfinite(scores).all()),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, n: int, out: str) -> None:
    import torch.distributed as dist

    from datainf_core.distributed import compute_influence_distributed, shard_range

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    train, query = synthetic(n)
    rows = shard_range(n, rank, world)
    shard = {k: ShardBlock(v, rows.start, rows.stop - rows.start) for k, v in train.items()}
    dist.barrier()
    start = time.perf_counter()
    scores = compute_influence_distributed(shard, query, memory_budget_bytes=BUDGET, gather=True)
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds, "n": int(scores.numel())}))
    dist.destroy_process_group()


def processes_wall(n: int, tmp: Path) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    from datainf_core.influence import compute_influence

    rows = []
    train, query = synthetic(n)
    threads = torch.get_num_threads()
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        start = time.perf_counter()
        compute_influence(train, query, memory_budget_bytes=BUDGET)
        seconds = time.perf_counter() - start
        rows.append({"processes": 1, "torch_threads": count, "seconds": seconds})
    torch.set_num_threads(threads)
    out = tmp / "two.json"
    mp.spawn(_rank_worker, args=(2, _free_port(), n, str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    rows.append({"processes": 2, "torch_threads": 1, "seconds": two["seconds"]})
    for row in rows:
        row["seconds"] = round(row["seconds"], 2)
        row["n"] = n
    return rows


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def projection_effect(widths: list[int]) -> list[dict[str, Any]]:
    from datainf_core.influence import compute_influence
    from datainf_core.projection import make_projection

    gen = torch.Generator().manual_seed(5)
    n, d, rank = 2000, 3072, 16
    train, query = {}, {}
    for b in range(8):
        basis = torch.randn(rank, d, generator=gen)
        train[f"block{b}"] = torch.randn(n, rank, generator=gen) @ basis + 0.5 * torch.randn(
            n, d, generator=gen
        )
        query[f"block{b}"] = torch.randn(4, rank, generator=gen) @ basis
    full = compute_influence(train, query)
    rows = []
    for width in widths:
        proj = make_projection(train, dim=width, seed=0)
        start = time.perf_counter()
        projected = compute_influence(proj.apply(train), proj.apply(query))
        rows.append(
            {
                "projection_dim": width,
                "block_dim": d,
                "spearman_vs_unprojected": round(_spearman(projected, full), 4),
                "top100_overlap": len(
                    set(full.topk(100).indices.tolist()) & set(projected.topk(100).indices.tolist())
                )
                / 100,
                "seconds_with_projection": round(time.perf_counter() - start, 2),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 2,000 vs 20,000")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(peak_rss_child(args.child)))
        return 0
    started = time.perf_counter()
    small = 2000 if args.quick else 10_000
    sizes = [small, 10 * small]
    memory_rows = []
    for n in sizes:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
        )
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(n)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        memory_rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    growth = memory_rows[1]["peak_rss_mib"] / memory_rows[0]["peak_rss_mib"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    process_rows = processes_wall(sizes[1], RESULTS)
    projection_rows = projection_effect([256, 1024])
    print(table(memory_rows))
    print(f"\npeak RSS growth for {sizes[1]:,} vs {sizes[0]:,} samples: {growth:.3f}x\n")
    print(table(process_rows))
    print()
    print(table(projection_rows))
    result = {
        "summary": (
            f"Aggregate DataInf on lazily generated gradients ({BLOCKS} blocks of {WIDTH}), "
            f"memory budget {BUDGET >> 20} MiB: peak RSS grows {growth:.3f}x from n = "
            f"{sizes[0]:,} to {sizes[1]:,} (goal ≤ 1.2x)."
        ),
        "peak_rss": memory_rows,
        "rss_growth": round(growth, 3),
        "processes": process_rows,
        "projection": projection_rows,
        "load_average_1min": round(os.getloadavg()[0], 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (RESULTS / "memory.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
