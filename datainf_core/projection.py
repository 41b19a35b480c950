"""Seeded random projection of per-sample gradients, per block, for stores too large to keep.

Each block with ``d_block > dim`` is multiplied by a Gaussian matrix ``P_b`` (``d_block x dim``,
entries N(0, 1/dim)), so inner products are kept in expectation (Johnson–Lindenstrauss):
``E[(P xᵀ)(P y)] = xᵀy`` with a spread of about ``‖x‖‖y‖ √(2/dim)``. Blocks no wider than ``dim``
pass through unchanged. The matrix depends only on ``(seed, block name, d_block, dim)``, and is
generated in row slices from seeded CPU generators, so the train and query gradients, every rank
and every run see the same one.

Trade-off: storage and scoring cost drop by ``d_block / dim``; the scores become those of the
projected problem (DataInf on ``P g``), whose ranking agrees with the unprojected one the more
closely the larger ``dim`` is. ``bench/bench_memory.py`` measures the rank correlation.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from datainf_core.errors import InfluenceInputError

ROWS_PER_SLICE = 1024  # rows of P generated from one seeded generator
CACHE_BYTES = 256 << 20  # projection matrices kept in memory across calls


def _slice_seed(seed: int, name: str, d_block: int, dim: int, index: int) -> int:
    key = f"{seed}:{name}:{d_block}:{dim}:{index}".encode()
    return zlib.crc32(key) | (seed % (1 << 31)) << 32


@dataclass
class GradientProjection:
    """A per-block random projection; see the module docstring.

    Attributes:
        block_dims: Block name → input dimension ``d_block``.
        dim: Output dimension of every projected block.
        seed: Seed of the Gaussian matrices.
    """

    block_dims: dict[str, int]
    dim: int = 4096
    seed: int = 0
    _cache: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def output_dims(self) -> dict[str, int]:
        """Block name → dimension after projection."""
        return {name: min(d, self.dim) for name, d in self.block_dims.items()}

    def matrix(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """``P_b`` for block ``name``: ``d_block x dim`` float32 (generated on CPU, then moved)."""
        d_block = self._dim_of(name)
        key = (name, str(device))
        if key in self._cache:
            return self._cache[key]
        slices = []
        for index, start in enumerate(range(0, d_block, ROWS_PER_SLICE)):
            rows = min(ROWS_PER_SLICE, d_block - start)
            gen = torch.Generator().manual_seed(
                _slice_seed(self.seed, name, d_block, self.dim, index)
            )
            slices.append(torch.randn(rows, self.dim, generator=gen))
        matrix = (torch.cat(slices) / self.dim**0.5).to(device)  # d_block x dim
        if sum(t.numel() * 4 for t in self._cache.values()) + matrix.numel() * 4 <= CACHE_BYTES:
            self._cache[key] = matrix
        return matrix

    def project_block(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """Projects one block's gradients: ``n x d_block`` → ``n x min(d_block, dim)`` float32."""
        d_block = self._dim_of(name)
        if grads.dim() != 2 or grads.shape[1] != d_block:
            raise InfluenceInputError(
                f"block {name!r} should have shape (n, {d_block}) for this projection, got "
                f"{tuple(grads.shape)}; build the projection from the same adapter"
            )
        grads = grads.float()
        if d_block <= self.dim:
            return grads
        return grads @ self.matrix(name, grads.device)

    def apply(self, grads: Mapping[str, Any]) -> dict[str, Any]:
        """Projects a gradient mapping (train or query): tensors now, lazy blocks on slicing.

        Args:
            grads: Block name → ``n x d_block`` tensor, or a lazy block (``.shape``, slicing).

        Returns:
            Block name → ``n x min(d_block, dim)``: a tensor for tensors, a lazy block otherwise.
        """
        out: dict[str, Any] = {}
        for name, block in grads.items():
            if isinstance(block, torch.Tensor):
                out[name] = self.project_block(name, block)
            else:
                out[name] = ProjectedBlock(self, name, block)
        return out

    def _dim_of(self, name: str) -> int:
        if name not in self.block_dims:
            raise InfluenceInputError(
                f"block {name!r} is not in this projection ({len(self.block_dims)} blocks); build "
                "it with make_projection from the same gradient mapping"
            )
        return self.block_dims[name]


class ProjectedBlock:
    """A lazy block whose row slices are projected as they are read."""

    def __init__(self, projection: GradientProjection, name: str, block: Any) -> None:
        self._projection, self._name, self._block = projection, name, block
        self.shape = (int(block.shape[0]), projection.output_dims[name])

    def __getitem__(self, rows: slice) -> torch.Tensor:
        chunk = self._block[rows]
        if not isinstance(chunk, torch.Tensor):
            chunk = torch.as_tensor(chunk)
        return self._projection.project_block(self._name, chunk)


def make_projection(
    block_dims: Mapping[str, int] | Mapping[str, Any], *, dim: int = 4096, seed: int = 0
) -> GradientProjection:
    """Builds a projection for these blocks.

    Args:
        block_dims: Block name → ``d_block``, or a gradient mapping (its ``.shape[1]`` is used).
        dim: Output dimension per block (e.g. 4,096 or 8,192).
        seed: Seed; use the same for train and query gradients.
    """
    if not isinstance(dim, int) or dim < 1:
        raise InfluenceInputError(f"projection dim should be a positive integer, got {dim!r}")
    dims = {
        name: int(value) if isinstance(value, int) else int(value.shape[1])
        for name, value in block_dims.items()
    }
    return GradientProjection(block_dims=dims, dim=dim, seed=seed)
