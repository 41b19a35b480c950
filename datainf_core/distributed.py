"""Gradients and influence scores over torch.distributed ranks, each with a shard of the data.

:func:`collect_gradients_to_store_distributed` splits the store's shards over the ranks: each
rank computes and writes its contiguous range of shard files into the one store folder, then
rank 0 writes the manifest, so the store is the one a single process would have written.

Each rank reads only its own training rows. The per-block sums over samples (Σ‖g‖² for the
damping, the DataInf sums Σ_i c_i g_i, or the second moments of the exact and LiSSA methods) are
all-reduced, so every rank ends with the same vectors ``r_b``, then scores its own shard. With
gloo on CPU or NCCL on GPU (the query gradients' device decides where the reductions run).

The result equals the single-process one up to the order of floating-point additions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
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
from datainf_core.store import (
    MANIFEST,
    GradientStore,
    _write_json_atomic,
    compute_missing_shards,
    open_store_folder,
    store_projection,
    verified_shards,
)

logger = logging.getLogger(__name__)


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


def collect_gradients_to_store_distributed(
    model: Any,
    examples: Sequence[dict[str, Any]],
    store_dir: str | Path,
    *,
    key: Mapping[str, str],
    task: str,
    shard_size: int = 256,
    include: Sequence[str] | None = None,
    batch_size: int = 16,
    device: str | torch.device = "auto",
    diffusion: Any = None,
    method: str = "auto",
    progress: Any = None,
    group: Any = None,
    projection_dim: int | None = None,
) -> GradientStore:
    """:func:`~datainf_core.store.collect_gradients_to_store` with the shards split over ranks.

    Call it on every rank with the same arguments. Rank ``r`` keeps or computes the shards
    ``shard_range(count, r, world_size)`` (contiguous rows) and writes only those files; the
    entries are gathered, and rank 0 writes the manifest before a final barrier. The folder, key
    hash, shard files and rows are those of a single-process store, so either kind of run reuses
    the other's store. Shards are the unit of work: with fewer shards than ranks some ranks idle.

    Args:
        model, examples, store_dir, key, task, shard_size, include, batch_size, device,
            diffusion, method, projection_dim: As in ``collect_gradients_to_store`` (identical
            on every rank).
        progress: ``progress(done, total)`` in this rank's samples.
        group: Process group (default: the world).

    Returns:
        The complete store, on every rank.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    folder, manifest, count = open_store_folder(
        model,
        examples,
        store_dir,
        key=key,
        task=task,
        shard_size=shard_size,
        include=include,
        diffusion=diffusion,
        projection_dim=projection_dim,
    )
    projection = store_projection(manifest)
    mine = range(count)[shard_range(count, rank, world)]
    kept = verified_shards(folder, manifest, mine)
    total = sum(min(len(examples), (i + 1) * shard_size) - i * shard_size for i in mine)
    began = time.perf_counter()
    compute_missing_shards(
        model, examples, folder, mine, kept, shard_size=shard_size, task=task,
        progress=progress, include=include, batch_size=batch_size, device=device,
        diffusion=diffusion, method=method, projection=projection,
    )  # fmt: skip
    if progress is not None:
        progress(total, total)
    logger.info(
        "rank %d: %d of %d gradient shards ready in %.2f seconds",
        rank,
        len(mine),
        count,
        time.perf_counter() - began,
    )
    # Every rank's entries, in shard order; rank 0 records them once all files are on disk.
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, kept, group=group)
    entries = {int(i): entry for part in gathered for i, entry in part.items()}
    manifest["shards"] = [entries[i] for i in sorted(entries)]
    manifest["complete"] = len(entries) == count
    if rank == 0:
        _write_json_atomic(folder / MANIFEST, manifest)
    dist.barrier(group=group)
    return GradientStore(folder, manifest)


def splits_over_ranks(method: str, train_grads: Mapping[str, Any], group: Any = None) -> bool:
    """Whether ``method`` runs over the ranks of a run (else rank 0 computes it alone).

    Exact, LiSSA and self-influence solve in the primal across ranks, so they need every block's
    width ≤ n; self-influence also reduces on the train blocks' device, so not with NCCL.
    """
    if method not in ("exact", "lissa", "self_influence"):
        return True
    report = logger.warning if dist.get_rank(group) == 0 else logger.debug
    if method == "self_influence" and dist.get_backend(group) == "nccl":
        report("self-influence with NCCL runs on rank 0 alone")
        return False
    n = int(next(iter(train_grads.values())).shape[0])
    wide = [name for name, block in train_grads.items() if int(block.shape[1]) > n]
    if wide:
        report("%s: %d blocks wider than n=%d; rank 0 runs it alone", method, len(wide), n)
    return not wide


def compute_influence_over_ranks(
    train_grads: Mapping[str, Any],
    query_grads: Mapping[str, Any],
    *,
    device: str | torch.device = "auto",
    group: Any = None,
    **settings: Any,
) -> torch.Tensor:
    """Scores of the whole train set on every rank, each rank reducing its shard of it.

    Args:
        train_grads: Block name → all ``n x d_block`` train gradients (a lazy store: each rank
            reads only its :func:`shard_range` rows).
        query_grads: Block name → ``m x d_block`` query gradients, loaded once per rank (onto
            ``device`` with NCCL, whose reductions need CUDA tensors).
        device: The run's device.
        group: Process group (default: the world).
        settings: ``compute_influence_distributed`` settings (method, damping, aggregate, ...).

    Returns:
        float32 CPU scores, ``n`` or ``m x n``.
    """
    from datainf_core.device import resolve_device

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    where = resolve_device(device) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    query = {name: block[:].to(where) for name, block in query_grads.items()}  # m x d_block
    shard = shard_gradients(train_grads, rank, world)
    scores = compute_influence_distributed(shard, query, gather=True, group=group, **settings)
    return scores.cpu()


def compute_self_influence_over_ranks(
    train_grads: Mapping[str, Any], *, group: Any = None, **settings: Any
) -> torch.Tensor:
    """Self-influence of the whole train set (float32 CPU, ``n``) on every rank; gloo only."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shard = shard_gradients(train_grads, rank, world)
    return compute_self_influence_distributed(shard, gather=True, group=group, **settings).cpu()
