"""Influence scores of training samples on query samples: DataInf, Exact, LiSSA, Hessian-free.

Every method computes, per block ``b`` (one adapter tensor), a vector ``r_b ≈ (G_b + λ_b I)⁻¹ v_b``
with ``G_b = (1/n) Σ_i g_bi g_biᵀ`` the empirical Fisher of the training gradients and ``v_b`` the
query gradient, then scores training sample ``k`` as

    s_k = −Σ_b r_bᵀ g_bk

Positive = harmful (up-weighting sample ``k`` raises the query loss: a likely mislabel), negative =
helpful. Training gradients are read in chunks of rows (``train_grads[name][start:stop]``), so a
lazy on-disk store larger than memory works; sums over samples accumulate in float64.

Passes over the training gradients (each pass reads every block once, chunk by chunk):

- ``datainf``: 2 with ``damping_mode="absolute"``; 3 with ``"relative"`` (the first only sums
  ‖g‖² per block, because λ must be known before the first DataInf sum; its per-sample norms are
  cached, O(n · blocks) floats).
- ``exact`` and ``lissa``: 2 (λ comes from the trace of ``G``), more if the per-block solver state
  exceeds the memory budget and the blocks are split into groups.
- ``hessian_free``: 1.

The reductions over samples go through a ``reduce`` hook, which :mod:`datainf_core.distributed`
replaces with an all-reduce so that each rank can work on its shard of the training set.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from datainf_core.errors import InfluenceInputError

logger = logging.getLogger(__name__)

METHODS = ("datainf", "exact", "lissa", "hessian_free")
DAMPING_MODES = ("relative", "absolute")
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of chunk buffers and solver state
CACHE_CHUNK_BYTES = 8 << 20  # one in-memory block chunk, sized to stay in cache within a pass
DEFAULT_LISSA_ITERATIONS = 1000
# Below this many train gradient elements every product runs in float64 (it costs nothing there,
# and DataInf's n = 1 case cancels badly in float32); above it the products run in float32.
FLOAT64_ELEMENTS = 1 << 21
LISSA_TOLERANCE = 1e-3  # relative residual ‖r̂(G+λI) − v‖ / ‖v‖ above which LiSSA warns
LISSA_STOP = 1e-7  # residual at which LiSSA stops before ``lissa_iterations``
LISSA_CHECK_EVERY = 25

Progress = Callable[[int, int], Any]
Reduce = Callable[[torch.Tensor], torch.Tensor]
Sink = Callable[[slice, slice, torch.Tensor], Any]


class LissaConvergenceWarning(UserWarning):
    """LiSSA stopped before its residual fell below ``LISSA_TOLERANCE``."""


def _no_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class _Context:
    """Validated inputs and settings shared by the passes."""

    train: Mapping[str, Any]
    names: list[str]
    dims: dict[str, int]
    n_local: int
    n_total: int
    device: torch.device
    damping: float
    relative: bool
    unit_norm: bool
    chunk_rows: int
    budget: int
    reduce: Reduce
    progress: Progress | None
    dtype: torch.dtype = torch.float32
    steps_done: int = 0
    steps_total: int = 0

    def chunks(self) -> list[tuple[int, int]]:
        return [
            (start, min(start + self.chunk_rows, self.n_local))
            for start in range(0, self.n_local, self.chunk_rows)
        ]

    def step(self) -> None:
        self.steps_done += 1
        if self.progress is not None:
            self.progress(self.steps_done, max(self.steps_total, self.steps_done))


# 1. Input checks ---------------------------------------------------------------------------------


def _shape(block: Any, name: str, which: str) -> tuple[int, int]:
    shape = getattr(block, "shape", None)
    if shape is None or len(shape) != 2:
        raise InfluenceInputError(
            f"{which} gradient block {name!r} should have shape (samples, dims), got {shape}; "
            "flatten each adapter tensor's gradient to one row per sample"
        )
    return int(shape[0]), int(shape[1])


def _check_blocks(
    train_grads: Mapping[str, Any], query_grads: Mapping[str, Any] | None
) -> tuple[list[str], dict[str, int], int, int]:
    """Checks block names and shapes; returns (names, dims, n, m)."""
    if not isinstance(train_grads, Mapping) or len(train_grads) == 0:
        raise InfluenceInputError(
            f"train_grads should be a non-empty mapping of block name → (n, d) gradients, got "
            f"{type(train_grads).__name__} of length {len(train_grads) if train_grads else 0}"
        )
    names = list(train_grads.keys())
    if query_grads is not None:
        missing = [name for name in names if name not in query_grads]
        extra = [name for name in query_grads if name not in train_grads]
        if missing:
            raise InfluenceInputError(
                f"query_grads lacks block {missing[0]!r} ({len(missing)} missing) that "
                "train_grads has; collect both with the same adapter and include patterns"
            )
        if extra:
            raise InfluenceInputError(
                f"query_grads has block {extra[0]!r} ({len(extra)} extra) that train_grads "
                "lacks; collect both with the same adapter and include patterns"
            )
    dims: dict[str, int] = {}
    n = m = -1
    for name in names:
        n_b, d_b = _shape(train_grads[name], name, "train")
        if n >= 0 and n_b != n:
            raise InfluenceInputError(
                f"train gradient block {name!r} has {n_b} samples but earlier blocks have {n}; "
                "every block needs one row per training sample"
            )
        n = n_b
        if d_b == 0:
            raise InfluenceInputError(f"train gradient block {name!r} has 0 dims; drop it")
        dims[name] = d_b
        if query_grads is not None:
            m_b, q_b = _shape(query_grads[name], name, "query")
            if q_b != d_b:
                raise InfluenceInputError(
                    f"block {name!r} has {d_b} dims in train_grads but {q_b} in query_grads; "
                    "collect both from the same adapter"
                )
            if m >= 0 and m_b != m:
                raise InfluenceInputError(
                    f"query gradient block {name!r} has {m_b} samples but earlier blocks have "
                    f"{m}; every block needs one row per query sample"
                )
            m = m_b
    if n == 0:
        raise InfluenceInputError(
            f"train gradient block {names[0]!r} has n = 0 samples; give at least one training "
            "sample"
        )
    if m == 0:
        raise InfluenceInputError(
            f"query gradient block {names[0]!r} has m = 0 samples; give at least one query sample"
        )
    return names, dims, n, m


def _check_settings(method: str, damping: float, damping_mode: str, aggregate: str | None) -> None:
    if method not in METHODS:
        raise InfluenceInputError(f"method should be one of {METHODS}, got {method!r}")
    if damping_mode not in DAMPING_MODES:
        raise InfluenceInputError(
            f"damping_mode should be one of {DAMPING_MODES}, got {damping_mode!r}"
        )
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
        raise InfluenceInputError(f"damping should be a positive number, got {damping!r}; try 0.1")
    if aggregate not in ("mean", None):
        raise InfluenceInputError(f"aggregate should be 'mean' or None, got {aggregate!r}")


def _report_nonfinite(name: str, sq_norms: torch.Tensor, start: int, which: str) -> None:
    bad = torch.nonzero(~torch.isfinite(sq_norms)).flatten()
    if bad.numel():
        raise InfluenceInputError(
            f"{which} gradient block {name!r} has NaN or inf values in sample {start + int(bad[0])}"
            f" ({bad.numel()} such samples in rows {start}..); recollect gradients (check the loss "
            "and learning rate) or drop those samples"
        )


def _chunk_rows(
    dims: Mapping[str, int], extra_per_row: int, budget: int, n: int, in_memory: bool
) -> int:
    """Rows per chunk: what the budget allows; for in-memory tensors also what fits in cache.

    In-memory blocks are sliced without copies, so a small chunk costs nothing but keeps each
    block's rows in cache between the products of one pass; lazy blocks get the budget's rows.
    """
    per_row = 4 * sum(dims.values()) * 2 + extra_per_row
    rows = budget // max(per_row, 1)
    if in_memory:
        rows = min(rows, max(CACHE_CHUNK_BYTES // (4 * max(dims.values())), 16))
    return max(1, min(n, rows))


# 2. Reading ---------------------------------------------------------------------------------------


def _read(ctx: _Context, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of train block ``name``: chunk x d_block on ``ctx.device``.

    float32 as stored; float64 for problems small enough that precision costs nothing.
    """
    chunk = ctx.train[name][start:stop]
    if not isinstance(chunk, torch.Tensor):
        chunk = torch.as_tensor(chunk)
    return chunk.to(device=ctx.device, dtype=torch.float32).to(ctx.dtype)


def _load_query(
    query_grads: Mapping[str, Any], names: list[str], m: int, device: torch.device | None
) -> tuple[dict[str, torch.Tensor], torch.device]:
    """Query gradients as float64 tensors (m x d_block each), checked for NaN/inf."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        block = query_grads[name][0:m]
        if not isinstance(block, torch.Tensor):
            block = torch.as_tensor(block)
        if device is None:
            device = block.device
        block = block.to(device=device, dtype=torch.float64)
        _report_nonfinite(name, block.square().sum(dim=1), 0, "query")
        out[name] = block
    assert device is not None
    return out, device


def _sq_norms(chunk: torch.Tensor) -> torch.Tensor:
    """Per-row ‖g‖², float64 (chunk)."""
    return torch.linalg.vector_norm(chunk, dim=1).double().square()


def _row_scale(ctx: _Context, blocks: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """1 / ‖g_i‖ over all blocks (chunk,) float64 when ``unit_norm``, else None."""
    if not ctx.unit_norm:
        return None
    total = sum(_sq_norms(block) for block in blocks.values())
    return 1.0 / torch.sqrt(torch.clamp(total, min=torch.finfo(torch.float64).tiny))


def _stats_pass(ctx: _Context) -> dict[str, torch.Tensor]:
    """Pass over the train gradients: per-sample ‖g_b‖² (after unit-norm scaling), (n,) each."""
    norms = {
        name: torch.empty(ctx.n_local, dtype=torch.float64, device=ctx.device) for name in ctx.names
    }
    for start, stop in ctx.chunks():
        for name in ctx.names:
            sq = _sq_norms(_read(ctx, name, start, stop))
            _report_nonfinite(name, sq, start, "train")
            norms[name][start:stop] = sq
        ctx.step()
    if ctx.unit_norm:
        total = torch.clamp(sum(norms.values()), min=torch.finfo(torch.float64).tiny)
        for name in ctx.names:
            norms[name] /= total
    return norms


def _full_scale(norms: Mapping[str, torch.Tensor], n_local: int) -> torch.Tensor:
    """1 / ‖g_i‖ over all blocks from raw cached norms (n,)."""
    total = torch.clamp(sum(norms.values()), min=torch.finfo(torch.float64).tiny)
    return 1.0 / torch.sqrt(total)


def _lambda(ctx: _Context, name: str, sum_sq: float) -> float:
    """λ_b: ``damping`` (absolute) or damping · Σ_i ‖g_bi‖² / (n d_b) (relative, as in the paper).

    A block whose training gradients are all zero (e.g. ``lora_A`` while ``lora_B`` is still at its
    zero initialisation) scores 0 whatever λ is; it gets λ = ``damping`` and a warning.
    """
    if not ctx.relative:
        return ctx.damping
    if sum_sq <= 0:
        logger.warning("train gradient block %r is all zeros; it adds nothing to the scores", name)
        return ctx.damping
    return ctx.damping * sum_sq / (ctx.n_total * ctx.dims[name])


# 3. Per-block vectors r_b ---------------------------------------------------------------------


def _datainf_vectors(ctx: _Context, query: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataInf: r = (1/(nλ)) Σ_i (v − (vᵀg_i)/(λ + ‖g_i‖²) g_i), for every query row at once.

    Returns, per block, R (m x d_block) float64.
    """
    cached = None
    lams: dict[str, float] = {}
    if ctx.relative:
        cached = _stats_pass(ctx)
        sums = torch.stack([cached[name].sum() for name in ctx.names])
        sums = ctx.reduce(sums)
        lams = {name: _lambda(ctx, name, float(s)) for name, s in zip(ctx.names, sums, strict=True)}
    else:
        lams = {name: ctx.damping for name in ctx.names}
    acc = {name: torch.zeros_like(query[name]) for name in ctx.names}  # m x d_block float64
    query32 = {name: query[name].to(ctx.dtype) for name in ctx.names}
    for start, stop in ctx.chunks():
        blocks = {name: _read(ctx, name, start, stop) for name in ctx.names}
        if cached is None:
            sq = {name: _sq_norms(blocks[name]) for name in ctx.names}
            for name in ctx.names:
                _report_nonfinite(name, sq[name], start, "train")
            scale = _row_scale(ctx, blocks)
            if scale is not None:
                sq = {name: sq[name] * scale.square() for name in ctx.names}
        else:
            sq = {name: cached[name][start:stop] for name in ctx.names}
            scale = _row_scale(ctx, blocks) if ctx.unit_norm else None
        for name in ctx.names:
            x = blocks[name]  # chunk x d_block
            dots = (x @ query32[name].T).double()  # chunk x m: g_iᵀ v
            weight = 1.0 / (lams[name] + sq[name])  # chunk
            if scale is not None:
                weight = weight * scale.square()  # both g_i factors scaled by 1/‖g_i‖
            coef = dots * weight[:, None]  # chunk x m
            acc[name] += (coef.to(ctx.dtype).T @ x).double()  # m x d_block: Σ_i c_i g_i
        ctx.step()
    vectors = {}
    for name, total in zip(ctx.names, _reduce_dict(ctx, acc), strict=True):
        lam = lams[name]
        vectors[name] = (query[name] - total / ctx.n_total) / lam  # Eq. (DataInf closed form)
    return vectors


def _reduce_dict(ctx: _Context, tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Sums every tensor over ranks in one flat reduce; returns them in ``ctx.names`` order."""
    if ctx.reduce is _no_reduce:
        return [tensors[name] for name in ctx.names]
    flat = torch.cat([tensors[name].reshape(-1) for name in ctx.names])
    flat = ctx.reduce(flat)
    out, offset = [], 0
    for name in ctx.names:
        size = tensors[name].numel()
        out.append(flat[offset : offset + size].view_as(tensors[name]))
        offset += size
    return out


def _group_blocks(ctx: _Context, state_bytes: Mapping[str, int]) -> list[list[str]]:
    """Splits blocks into groups whose solver state fits half the memory budget."""
    groups: list[list[str]] = [[]]
    used = 0
    for name in ctx.names:
        size = state_bytes[name]
        if groups[-1] and used + size > ctx.budget // 2:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
        if size > ctx.budget // 2:
            logger.warning(
                "block %r needs %.1f MiB of solver state, over half the memory budget",
                name,
                size / 2**20,
            )
    return groups


def _is_dual(ctx: _Context, name: str) -> bool:
    return ctx.dims[name] > ctx.n_total


def _second_moments(
    ctx: _Context,
    group: list[str],
    scale_all: torch.Tensor | None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One pass: per block Σ_i w_i g_i g_iᵀ (d x d, primal) or the rows X (n x d, dual), float64.

    Also returns Σ_i ‖g_i‖² per block (for relative damping), reduced over ranks.
    """
    state: dict[str, torch.Tensor] = {}
    for name in group:
        d_b = ctx.dims[name]
        shape = (ctx.n_local, d_b) if _is_dual(ctx, name) else (d_b, d_b)
        state[name] = torch.zeros(shape, dtype=torch.float64, device=ctx.device)
    sum_sq = torch.zeros(len(group), dtype=torch.float64, device=ctx.device)
    for start, stop in ctx.chunks():
        blocks = {name: _read(ctx, name, start, stop) for name in group}
        scale = scale_all[start:stop] if scale_all is not None else _row_scale(ctx, blocks)
        for index, name in enumerate(group):
            x = blocks[name].double()  # chunk x d_block
            sq = x.square().sum(dim=1)
            _report_nonfinite(name, sq, start, "train")
            if scale is not None:
                x = x * scale[:, None]
                sq = sq * scale.square()
            sum_sq[index] += sq.sum()
            if _is_dual(ctx, name):
                state[name][start:stop] = x
            else:
                wx = x if weights is None else x * weights[name][start:stop, None]
                state[name] += wx.T @ x  # d x d
        ctx.step()
    sums = ctx.reduce(sum_sq)
    primal = {name: state[name] for name in group if not _is_dual(ctx, name)}
    if primal:
        reduced = ctx.reduce(torch.cat([t.reshape(-1) for t in primal.values()]))
        offset = 0
        for name, tensor in primal.items():
            state[name] = reduced[offset : offset + tensor.numel()].view_as(tensor)
            offset += tensor.numel()
    return state, {name: float(s) for name, s in zip(group, sums, strict=True)}


def _solver_groups(ctx: _Context) -> list[list[str]]:
    state = {}
    for name in ctx.names:
        d_b = ctx.dims[name]
        state[name] = 8 * (ctx.n_local * d_b + ctx.n_total**2 if _is_dual(ctx, name) else d_b * d_b)
    return _group_blocks(ctx, state)


def _exact_vectors(
    ctx: _Context, query: Mapping[str, torch.Tensor], scale_all: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Exact: R = V (G + λI)⁻¹ by Cholesky, or by the n x n dual form when d_block > n."""
    vectors: dict[str, torch.Tensor] = {}
    for group in _solver_groups(ctx):
        state, sums = _second_moments(ctx, group, scale_all)
        for name in group:
            lam = _lambda(ctx, name, sums[name])
            v = query[name]  # m x d_block
            if _is_dual(ctx, name):
                x = state[name]  # n x d_block
                gram = x @ x.T  # n x n
                gram.diagonal().add_(ctx.n_total * lam)
                # (XᵀX/n + λI)⁻¹ = (1/λ)(I − Xᵀ(nλI + XXᵀ)⁻¹X)  (Woodbury)
                z = torch.cholesky_solve(x @ v.T, torch.linalg.cholesky(gram))  # n x m
                vectors[name] = (v - z.T @ x) / lam
            else:
                h = state[name] / ctx.n_total  # d x d
                h.diagonal().add_(lam)
                vectors[name] = torch.cholesky_solve(v.T, torch.linalg.cholesky(h)).T
    return vectors


def _top_eigenvalue(
    apply_h: Callable[[torch.Tensor], torch.Tensor], d: int, device: torch.device
) -> float:
    """Largest eigenvalue of a symmetric PSD operator by 30 power iterations (seeded start)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    vec = torch.randn(1, d, generator=gen, dtype=torch.float64).to(device)
    value = 0.0
    for _ in range(30):
        vec = vec / torch.linalg.vector_norm(vec)
        image = apply_h(vec)
        value = float((image * vec).sum())
        vec = image
    return value


def _damped_fisher(
    state: torch.Tensor, lam: float, dual: bool, n_total: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """r ↦ r (G + λI) for rows r (m x d_block), from Σ g gᵀ (primal) or the rows X (dual)."""
    if dual:
        return lambda r: (r @ state.T) @ state / n_total + lam * r
    fisher = state / n_total
    return lambda r: r @ fisher + lam * r


def _lissa_vectors(
    ctx: _Context,
    query: Mapping[str, torch.Tensor],
    scale_all: torch.Tensor | None,
    iterations: int,
    lissa_scale: float | None,
) -> dict[str, torch.Tensor]:
    """LiSSA without sampling: r_{t+1} = v + r_t − (G + λI) r_t / s, r̂ = r_T / s.

    The fixed point is s (G + λI)⁻¹ v; it converges when s exceeds half the top eigenvalue of
    G + λI (the default s is that eigenvalue, estimated by power iteration). The damping enters
    with a plus sign, as (G + λI).
    """
    vectors: dict[str, torch.Tensor] = {}
    unconverged: list[tuple[float, str, float]] = []
    for group in _solver_groups(ctx):
        state, sums = _second_moments(ctx, group, scale_all)
        for name in group:
            lam = _lambda(ctx, name, sums[name])
            apply_h = _damped_fisher(state[name], lam, _is_dual(ctx, name), ctx.n_total)
            scale = lissa_scale or _top_eigenvalue(apply_h, ctx.dims[name], ctx.device)
            v = query[name]
            r = v.clone()
            v_norm = torch.clamp(torch.linalg.vector_norm(v), min=1e-300)
            done = 0
            residual = math.inf
            while done < iterations and residual > LISSA_STOP:
                for _ in range(min(LISSA_CHECK_EVERY, iterations - done)):
                    r = v + r - apply_h(r) / scale
                done = min(done + LISSA_CHECK_EVERY, iterations)
                residual = float(torch.linalg.vector_norm(apply_h(r / scale) - v) / v_norm)
            estimate = r / scale
            if not math.isfinite(residual) or residual > LISSA_TOLERANCE:
                unconverged.append((residual, name, scale))
            vectors[name] = estimate
    if unconverged:
        # One warning per call, naming the worst block (a per-block warning floods the CLI).
        residual, name, scale = max(
            unconverged, key=lambda item: (not math.isfinite(item[0]), item[0])
        )
        message = (
            f"LiSSA did not converge for {len(unconverged)} of {len(vectors)} blocks (worst "
            f"{name!r}: relative residual {residual:.2e} after {iterations} iterations, scale "
            f"{scale:.3g}); raise lissa_iterations or use method='exact'"
        )
        logger.warning(message)
        warnings.warn(message, LissaConvergenceWarning, stacklevel=4)
    return vectors


# 4. Scoring ---------------------------------------------------------------------------------------


def _score_pass(
    ctx: _Context,
    vectors: Mapping[str, torch.Tensor],
    scale_all: torch.Tensor | None,
    per_block: bool,
    out: Sink | None,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor] | None]:
    """Pass over the train gradients: S = −Σ_b R_b G_bᵀ in tiles of (m x chunk).

    Returns the (m, n_local) scores (float64) and, if ``per_block``, the per-block parts, unless
    ``out`` is given, which receives every tile instead.
    """
    m = next(iter(vectors.values())).shape[0]
    vectors32 = {name: vectors[name].to(ctx.dtype) for name in ctx.names}  # m x d_block
    keep = out is None
    total = torch.zeros((m, ctx.n_local), dtype=torch.float64, device=ctx.device) if keep else None
    parts = (
        {
            name: torch.zeros((m, ctx.n_local), dtype=torch.float64, device=ctx.device)
            for name in ctx.names
        }
        if per_block
        else None
    )
    for start, stop in ctx.chunks():
        blocks = {name: _read(ctx, name, start, stop) for name in ctx.names}
        scale = scale_all[start:stop] if scale_all is not None else _row_scale(ctx, blocks)
        tile = torch.zeros((m, stop - start), dtype=torch.float64, device=ctx.device)
        for name in ctx.names:
            part = (vectors32[name] @ blocks[name].T).double()  # m x chunk
            if scale is not None:
                part = part * scale[None, :]
            part = part.neg_()  # s_k = −r_bᵀ g_bk
            if not bool(torch.isfinite(part).all()):
                _report_nonfinite(name, part.sum(dim=0), start, "train")
            tile += part
            if parts is not None:
                parts[name][:, start:stop] = part
        if total is not None:
            total[:, start:stop] = tile
        else:
            assert out is not None
            out(slice(0, m), slice(start, stop), tile.float())
        ctx.step()
    return total, parts


# 5. Public API -------------------------------------------------------------------------------------


def _make_context(
    train_grads: Mapping[str, Any],
    names: list[str],
    dims: dict[str, int],
    n_local: int,
    n_total: int,
    device: torch.device,
    *,
    damping: float,
    damping_mode: str,
    unit_norm: bool,
    chunk_size: int | None,
    memory_budget_bytes: int,
    extra_per_row: int,
    reduce: Reduce,
    progress: Progress | None,
) -> _Context:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise InfluenceInputError(
            f"chunk_size should be a positive integer or None, got {chunk_size!r}"
        )
    if memory_budget_bytes < 1:
        raise InfluenceInputError(
            f"memory_budget_bytes should be positive, got {memory_budget_bytes!r}; try 2**30"
        )
    in_memory = all(isinstance(train_grads[name], torch.Tensor) for name in names)
    rows = chunk_size or _chunk_rows(dims, extra_per_row, memory_budget_bytes, n_local, in_memory)
    small = n_total * sum(dims.values()) <= FLOAT64_ELEMENTS
    return _Context(
        train=train_grads,
        names=names,
        dims=dims,
        n_local=n_local,
        n_total=n_total,
        device=device,
        damping=float(damping),
        relative=damping_mode == "relative",
        unit_norm=unit_norm,
        chunk_rows=max(1, min(rows, max(n_local, 1))),
        budget=int(memory_budget_bytes),
        reduce=reduce,
        progress=progress,
        dtype=torch.float64 if small else torch.float32,
    )


def _query_matrix(
    query: dict[str, torch.Tensor], names: list[str], unit_norm: bool, aggregate: str | None
) -> dict[str, torch.Tensor]:
    """Applies unit-norm scaling per query sample, then the mean over queries if aggregating."""
    if unit_norm:
        total = sum(query[name].square().sum(dim=1) for name in names)
        scale = 1.0 / torch.sqrt(torch.clamp(total, min=torch.finfo(torch.float64).tiny))
        query = {name: query[name] * scale[:, None] for name in names}
    if aggregate == "mean":
        query = {name: query[name].mean(dim=0, keepdim=True) for name in names}  # 1 x d_block
    return query


def _run(
    train_grads: Mapping[str, Any],
    query_grads: Mapping[str, Any],
    *,
    method: str,
    damping: float,
    damping_mode: str,
    aggregate: str | None,
    per_block: bool,
    unit_norm: bool,
    lissa_iterations: int,
    lissa_scale: float | None,
    chunk_size: int | None,
    memory_budget_bytes: int,
    progress: Progress | None,
    out: Sink | None,
    reduce: Reduce,
    n_total: int | None,
) -> torch.Tensor | dict[str, torch.Tensor] | None:
    """Shared body of :func:`compute_influence` and the distributed variant."""
    started = time.perf_counter()
    _check_settings(method, damping, damping_mode, aggregate)
    if per_block and out is not None:
        raise InfluenceInputError(
            "per_block=True cannot be combined with out=; ask for per-block scores without a sink"
        )
    if lissa_iterations < 1:
        raise InfluenceInputError(f"lissa_iterations should be at least 1, got {lissa_iterations}")
    names, dims, n, m = _check_blocks(train_grads, query_grads)
    query, device = _load_query(query_grads, names, m, None)
    query = _query_matrix(query, names, unit_norm, aggregate)
    m_eff = next(iter(query.values())).shape[0]
    ctx = _make_context(
        train_grads,
        names,
        dims,
        n,
        n if n_total is None else n_total,
        device,
        damping=damping,
        damping_mode=damping_mode,
        unit_norm=unit_norm,
        chunk_size=chunk_size,
        memory_budget_bytes=memory_budget_bytes,
        extra_per_row=8 * m_eff * (2 + (len(names) if per_block else 0)),
        reduce=reduce,
        progress=progress,
    )
    chunks = len(ctx.chunks())
    # Passes: [stats] + [reduction] + scoring. Group methods may need more; progress then grows.
    needs_stats = method in ("exact", "lissa") and unit_norm and len(_solver_groups(ctx)) > 1
    passes = {"datainf": 2 + int(ctx.relative), "hessian_free": 1}.get(
        method, 1 + len(_solver_groups(ctx)) + int(needs_stats)
    )
    ctx.steps_total = passes * chunks
    scale_all = None
    if needs_stats:
        raw = _raw_norms(ctx)
        scale_all = _full_scale(raw, ctx.n_local)
    if method == "datainf":
        vectors = _datainf_vectors(ctx, query)
    elif method == "exact":
        vectors = _exact_vectors(ctx, query, scale_all)
    elif method == "lissa":
        vectors = _lissa_vectors(ctx, query, scale_all, lissa_iterations, lissa_scale)
    else:
        vectors = dict(query)
    total, parts = _score_pass(ctx, vectors, scale_all, per_block, out)
    logger.info(
        "influence (%s, %d train x %d query, %d blocks) in %.2f seconds",
        method,
        n,
        m,
        len(names),
        time.perf_counter() - started,
    )
    if total is None:
        return None
    shaped = _shape_scores(total, aggregate)
    if parts is not None:
        return {name: _shape_scores(parts[name], aggregate) for name in names}
    return shaped


def _raw_norms(ctx: _Context) -> dict[str, torch.Tensor]:
    unit = ctx.unit_norm
    ctx.unit_norm = False
    try:
        return _stats_pass(ctx)
    finally:
        ctx.unit_norm = unit


def _shape_scores(scores: torch.Tensor, aggregate: str | None) -> torch.Tensor:
    scores = scores.float()
    return scores[0] if aggregate == "mean" else scores


def compute_influence(
    train_grads: Mapping[str, Any],
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
) -> Any:
    """Influence of every training sample on the query samples.

    Score of training sample ``k``: ``s_k = −Σ_b r_bᵀ g_bk`` with ``r_b ≈ (G_b + λ_b I)⁻¹ v_b``.
    **Positive = harmful** (up-weighting ``k`` raises the query loss; a likely mislabel),
    **negative = helpful**.

    Args:
        train_grads: Block name → per-sample training gradients, shape ``n x d_block`` (a tensor, or
            a lazy block with ``.shape`` and ``[start:stop]`` slicing returning a float32 tensor).
        query_grads: Same block names → query gradients, shape ``m x d_block``.
        method: ``"datainf"`` (closed form of Kwon et al. 2024), ``"exact"`` (Cholesky of
            ``G + λI``, or the ``n x n`` dual when ``d_block > n``), ``"lissa"`` (deterministic LiSSA
            recursion), ``"hessian_free"`` (``r = v``, a plain gradient dot product).
        damping: ``λ_b = damping · mean_i ‖g_bi‖² / d_b`` when ``damping_mode="relative"`` (0.1 as in
            the paper); ``λ_b = damping`` when ``"absolute"``.
        damping_mode: ``"relative"`` or ``"absolute"``.
        aggregate: ``"mean"``: scores against the mean query gradient, shape ``n``. ``None``: one row
            per query sample, shape ``m x n``.
        per_block: Return a dict block → scores (same shape), which sum to the total.
        unit_norm: Scale each sample's full gradient (all blocks, train and query) to unit norm
            first: the cosine variant.
        lissa_iterations: Most iterations of the LiSSA recursion; it stops earlier once the
            relative residual is below 1e-7, and warns if it ends above 1e-3.
        lissa_scale: LiSSA scale ``s``; default: the top eigenvalue of ``G + λI`` per block.
        chunk_size: Training rows read at a time; default from ``memory_budget_bytes``.
        memory_budget_bytes: Bound on chunk buffers and solver state.
        progress: Called as ``progress(done, total)`` after every chunk of every pass.
        out: Optional sink ``out(query_slice, train_slice, scores)`` receiving the score matrix in
            tiles (``len(query_slice) x len(train_slice)`` float32, one row per query, or one row
            when ``aggregate="mean"``) as they are formed; the function then returns None.

    Returns:
        float32 tensor on the query gradients' device: ``n`` (aggregate) or ``m x n``; a dict of
        those per block if ``per_block``; None if ``out`` is given.

    Raises:
        InfluenceInputError: (a ValueError) missing or extra blocks, mismatched shapes, n = 0 or
            m = 0, NaN or inf gradients, bad settings.
    """
    return _run(
        train_grads,
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
        reduce=_no_reduce,
        n_total=None,
    )


def _self_influence(
    train_grads: Mapping[str, Any],
    *,
    damping: float,
    damping_mode: str,
    unit_norm: bool,
    chunk_size: int | None,
    memory_budget_bytes: int,
    progress: Progress | None,
    reduce: Reduce,
    n_total: int | None,
) -> torch.Tensor:
    _check_settings("datainf", damping, damping_mode, "mean")
    names, dims, n, _ = _check_blocks(train_grads, None)
    first = train_grads[names[0]][0:1]
    device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    ctx = _make_context(
        train_grads,
        names,
        dims,
        n,
        n if n_total is None else n_total,
        device,
        damping=damping,
        damping_mode=damping_mode,
        unit_norm=unit_norm,
        chunk_size=chunk_size,
        memory_budget_bytes=memory_budget_bytes,
        extra_per_row=0,
        reduce=reduce,
        progress=progress,
    )
    groups = _solver_groups(ctx)
    ctx.steps_total = len(ctx.chunks()) * (1 + 2 * len(groups))
    raw = _raw_norms(ctx)  # pass 1: ‖g_bi‖² (n,) per block
    scale_all = _full_scale(raw, n) if unit_norm else None
    norms = {
        name: raw[name] * scale_all.square() if scale_all is not None else raw[name]
        for name in names
    }
    sums = ctx.reduce(torch.stack([norms[name].sum() for name in names]))
    lams = {name: _lambda(ctx, name, float(s)) for name, s in zip(names, sums, strict=True)}
    weights = {name: 1.0 / (lams[name] + norms[name]) for name in names}  # (n,)
    result = torch.zeros(n, dtype=torch.float64, device=device)
    for group in groups:
        state, _ = _second_moments(ctx, group, scale_all, weights)  # pass 2
        for name in group:
            if _is_dual(ctx, name):
                x = state[name]  # n x d_block
                gram = x @ x.T  # n x n
                quad = (
                    gram.square() @ weights[name] / ctx.n_total
                )  # (1/n) Σ_i (g_iᵀg_k)²/(λ+‖g_i‖²)
                result += (norms[name] - quad) / lams[name]
        primal = [name for name in group if not _is_dual(ctx, name)]
        if not primal:
            continue
        for start, stop in ctx.chunks():  # pass 3: quadratic forms g_kᵀ M g_k
            for name in primal:
                x = _read(ctx, name, start, stop).double()
                if scale_all is not None:
                    x = x * scale_all[start:stop, None]
                quad = ((x @ state[name]) * x).sum(dim=1) / ctx.n_total
                result[start:stop] += (norms[name][start:stop] - quad) / lams[name]
            ctx.step()
    return result.float()


def compute_self_influence(
    train_grads: Mapping[str, Any],
    *,
    damping: float = 0.1,
    damping_mode: str = "relative",
    unit_norm: bool = False,
    chunk_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Self-influence ``g_kᵀ (G + λI)⁻¹ g_k`` of every training sample, DataInf-approximated.

    With DataInf's inverse ``(G + λI)⁻¹ ≈ (1/(nλ)) Σ_i (I − g_i g_iᵀ / (λ + ‖g_i‖²))`` this is, per
    block, ``(‖g_k‖² − (1/n) Σ_i (g_iᵀ g_k)² / (λ + ‖g_i‖²)) / λ``, summed over blocks. High values
    mark samples the rest of the data does not explain (a mislabel signal); always ≥ 0.

    Args:
        train_grads: Block name → ``n x d_block`` training gradients (tensor or lazy block).
        damping: As in :func:`compute_influence`.
        damping_mode: ``"relative"`` or ``"absolute"``.
        unit_norm: Scale each sample's full gradient to unit norm first.
        chunk_size: Training rows read at a time; default from ``memory_budget_bytes``.
        memory_budget_bytes: Bound on chunk buffers and the per-block ``d x d`` (or ``n x n``) state.
        progress: Called as ``progress(done, total)``.

    Returns:
        float32 tensor of shape ``n``.
    """
    return _self_influence(
        train_grads,
        damping=damping,
        damping_mode=damping_mode,
        unit_norm=unit_norm,
        chunk_size=chunk_size,
        memory_budget_bytes=memory_budget_bytes,
        progress=progress,
        reduce=_no_reduce,
        n_total=None,
    )
