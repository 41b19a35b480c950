"""A 2-process gloo run on CPU equals the single-process engine."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tolerances import DIST_RTOL

from datainf_core.distributed import (
    compute_influence_distributed,
    compute_self_influence_distributed,
    shard_gradients,
    shard_range,
)
from datainf_core.errors import InfluenceInputError
from datainf_core.influence import compute_influence, compute_self_influence

N, DIMS, M = 23, [6, 9, 4], 3
SETTINGS = [
    {"method": "datainf"},
    {"method": "datainf", "aggregate": None, "unit_norm": True},
    {"method": "datainf", "damping_mode": "absolute", "damping": 0.5, "aggregate": None},
    {"method": "exact", "aggregate": None},
    {"method": "lissa"},
    {"method": "hessian_free", "unit_norm": True},
    {"method": "datainf", "per_block": True},
]


def _grads(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"block{i}": torch.randn(n, d, generator=gen) * (i + 1) for i, d in enumerate(DIMS)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, path: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        train, query = _grads(N, 0), _grads(M, 1)
        rows = shard_range(N, rank, world)
        shard = shard_gradients(train, rank, world)  # lazy views of this rank's rows
        results = [
            compute_influence_distributed(shard, query, chunk_size=4, **kwargs)
            for kwargs in SETTINGS
        ]
        gathered = compute_influence_distributed(shard, query, aggregate=None, gather=True)
        self_inf = compute_self_influence_distributed(shard, unit_norm=True, gather=True)
        torch.save({"rows": (rows.start, rows.stop), "results": results}, f"{path}.{rank}")
        if rank == 0:
            torch.save({"gathered": gathered, "self": self_inf}, f"{path}.extra")
    finally:
        dist.destroy_process_group()


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def test_two_process_gloo_equals_single_process(tmp_path):
    path = str(tmp_path / "scores")
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    train, query = _grads(N, 0), _grads(M, 1)
    shards = [torch.load(f"{path}.{rank}") for rank in range(2)]
    for index, kwargs in enumerate(SETTINGS):
        single = compute_influence(train, query, **kwargs)
        for shard in shards:
            got, rows = shard["results"][index], slice(*shard["rows"])
            if isinstance(single, dict):
                for name in single:
                    assert _rel(got[name], single[name][..., rows]) <= DIST_RTOL, (kwargs, name)
            else:
                assert _rel(got, single[..., rows]) <= DIST_RTOL, kwargs
    extra = torch.load(f"{path}.extra")
    assert _rel(extra["gathered"], compute_influence(train, query, aggregate=None)) <= DIST_RTOL
    assert _rel(extra["self"], compute_self_influence(train, unit_norm=True)) <= DIST_RTOL


def test_shard_range_covers_rows_once():
    for n, world in ((10, 3), (2, 2), (7, 1), (5, 4)):
        rows = [shard_range(n, rank, world) for rank in range(world)]
        assert rows[0].start == 0 and rows[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(rows, rows[1:], strict=False))
        assert max(r.stop - r.start for r in rows) - min(r.stop - r.start for r in rows) <= 1


def test_needs_initialised_process_group():
    with pytest.raises(InfluenceInputError, match="init_process_group"):
        compute_influence_distributed(_grads(4, 0), _grads(1, 1))
