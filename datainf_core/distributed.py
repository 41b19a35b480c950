"""Influence scores over torch.distributed ranks, each holding a shard of the training set.

Each rank reads only its own training rows. The per-block sums over samples (Σ‖g‖² for the
damping, the DataInf sums Σ_i c_i g_i, or the second moments of the exact and LiSSA methods) are
all-reduced, so every rank ends with the same vectors ``r_b``, then scores its own shard. With
gloo on CPU or NCCL on GPU (the query gradients' device decides where the reductions run).

The result equals the single-process one up to the order of floating-point additions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from datainf_core.errors import InfluenceInputError
from datainf_core.influence import (
    DEFAULT_LISSA_ITERATIONS,
    DEFAULT_MEMORY_BUDGET,
    Progress,
    Sink,
    _run,
    _self_influence,
)


def shard_range(n: int, rank: int, world_size: int) -> slice:
    """Rows ``[start, stop)`` of an ``n``-row training set that rank ``rank`` owns (contiguous)."""
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    return slice(start, start + per + (1 if rank < extra else 0))


class ShardBlock:
    """Rows ``rows`` of a train block (tensor or lazy store block), as a block of its own.

    Keeps the lazy-block contract: ``.shape`` is ``(rows, d_block)`` and ``[start:stop]`` reads
    only those rows of the underlying block.
    """

    def __init__(self, block: Any, rows: slice) -> None:
        self._block, self._offset = block, rows.start
        self.shape = (rows.stop - rows.start, int(block.shape[1]))

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start = self._offset + (rows.start or 0)
        stop = self._offset + min(self.shape[0], self.shape[0] if rows.stop is None else rows.stop)
        return self._block[start:stop]


def shard_gradients(
    train_grads: Mapping[str, Any], rank: int, world_size: int
) -> dict[str, ShardBlock]:
    """This rank's contiguous shard (:func:`shard_range`) of every train block, read lazily."""
    n = int(next(iter(train_grads.values())).shape[0])
    rows = shard_range(n, rank, world_size)
    return {name: ShardBlock(block, rows) for name, block in train_grads.items()}


def _reducer(group: Any) -> Any:
    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    return reduce


def _local_rows(train_shard: Mapping[str, Any]) -> int:
    if not isinstance(train_shard, Mapping) or not train_shard:
        raise InfluenceInputError(
            "train_shard should be a non-empty mapping of block name → (n_rank, d) gradients"
        )
    return int(next(iter(train_shard.values())).shape[0])


def _total_rows(n_local: int, device: torch.device, group: Any) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise InfluenceInputError(
            "torch.distributed is not initialised; call dist.init_process_group first (or use "
            "compute_influence in one process)"
        )
    count = torch.tensor([n_local], dtype=torch.float64, device=device)
    dist.all_reduce(count, group=group)
    return int(count.item())


def _device_of(grads: Mapping[str, Any]) -> torch.device:
    first = next(iter(grads.values()))
    return first.device if isinstance(first, torch.Tensor) else torch.device("cpu")


def _check_primal(method: str, train_shard: Mapping[str, Any], n_total: int) -> None:
    if method not in ("exact", "lissa", "self_influence"):
        return
    for name, block in train_shard.items():
        if int(block.shape[1]) > n_total:
            raise InfluenceInputError(
                f"method {method!r} across ranks needs d ≤ n, but block {name!r} has "
                f"{int(block.shape[1])} dims for {n_total} samples; run it in one process or "
                "use method='datainf'"
            )


def gather_scores(scores: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenates every rank's scores along the last (train) axis, in rank order.

    Args:
        scores: This rank's scores, ``n_rank`` or ``m x n_rank``.
        group: Process group (default: the world).

    Returns:
        The full ``n`` or ``m x n`` scores on every rank.
    """
    sizes = [
        torch.zeros(1, dtype=torch.long, device=scores.device)
        for _ in range(dist.get_world_size(group))
    ]
    dist.all_gather(sizes, torch.tensor([scores.shape[-1]], device=scores.device), group=group)
    longest = max(int(s) for s in sizes)
    pad = torch.zeros((*scores.shape[:-1], longest), dtype=scores.dtype, device=scores.device)
    pad[..., : scores.shape[-1]] = scores
    pieces = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(pieces, pad, group=group)
    return torch.cat([p[..., : int(s)] for p, s in zip(pieces, sizes, strict=True)], dim=-1)


def compute_influence_distributed(
    train_shard: Mapping[str, Any],
    query_grads: Mapping[str, Any],
    *,
    method: str = "datainf",
    damping: float = 0.1,
    damping_mode: str = "relative",
    aggregate: str | None = "mean",
    per_block: bool = False,
    unit_norm: bool = False,
    lissa_iterations: int = DEFAULT_LISSA_ITERATIONS,
    lissa_scale: float | None = None,
    chunk_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    progress: Progress | None = None,
    out: Sink | None = None,
    gather: bool = False,
    group: Any = None,
) -> Any:
    """:func:`~datainf_core.influence.compute_influence` on this rank's shard of the train set.

    Call it on every rank of an initialised process group, with the same ``query_grads`` and
    settings everywhere. ``train_shard`` holds this rank's training rows (see :func:`shard_range`
    for the usual contiguous split); shards may differ in size but not be empty.

    Args:
        train_shard: Block name → this rank's ``n_rank x d_block`` training gradients.
        query_grads: Block name → ``m x d_block`` query gradients (identical on every rank).
        method, damping, damping_mode, aggregate, per_block, unit_norm, lissa_iterations,
            lissa_scale, chunk_size, memory_budget_bytes, progress, out: As in
            ``compute_influence``; ``out`` tiles carry this rank's local train slices.
        gather: Return the scores of the whole training set on every rank (rank order) instead
            of this rank's shard; not with ``per_block`` or ``out``.
        group: Process group (default: the world).

    Returns:
        float32 scores ``n_rank`` or ``m x n_rank`` (``n`` / ``m x n`` with ``gather``), a dict per
        block with ``per_block``, None with ``out``.
    """
    n_local = _local_rows(train_shard)
    n_total = _total_rows(n_local, _device_of(query_grads), group)
    _check_primal(method, train_shard, n_total)
    if gather and (per_block or out is not None):
        raise InfluenceInputError("gather=True cannot be combined with per_block or out; drop one")
    scores = _run(
        train_shard,
        query_grads,
        method=method,
        damping=damping,
        damping_mode=damping_mode,
        aggregate=aggregate,
        per_block=per_block,
        unit_norm=unit_norm,
        lissa_iterations=lissa_iterations,
        lissa_scale=lissa_scale,
        chunk_size=chunk_size,
        memory_budget_bytes=memory_budget_bytes,
        progress=progress,
        out=out,
        reduce=_reducer(group),
        n_total=n_total,
    )
    return gather_scores(scores, group) if gather else scores


def compute_self_influence_distributed(
    train_shard: Mapping[str, Any],
    *,
    damping: float = 0.1,
    damping_mode: str = "relative",
    unit_norm: bool = False,
    chunk_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    progress: Progress | None = None,
    gather: bool = False,
    group: Any = None,
) -> torch.Tensor:
    """:func:`~datainf_core.influence.compute_self_influence` on this rank's shard (d ≤ n only).

    Returns:
        float32 ``n_rank`` (``n`` with ``gather``).
    """
    n_local = _local_rows(train_shard)
    n_total = _total_rows(n_local, _device_of(train_shard), group)
    _check_primal("self_influence", train_shard, n_total)
    scores = _self_influence(
        train_shard,
        damping=damping,
        damping_mode=damping_mode,
        unit_norm=unit_norm,
        chunk_size=chunk_size,
        memory_budget_bytes=memory_budget_bytes,
        progress=progress,
        reduce=_reducer(group),
        n_total=n_total,
    )
    return gather_scores(scores, group) if gather else scores
