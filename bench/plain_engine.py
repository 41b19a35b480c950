"""The baseline: DataInf as the published code computes it, looping in Python over samples and blocks.

Gradients are held as one dict of block tensors per training sample; λ, the DataInf vector and
the scores are built with one small torch call per (sample, block) pair. Written here from the
paper's formulas as the reference point for bench_engine.py; not used by the package.
"""

from __future__ import annotations

import torch


def per_sample_dicts(grads: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Block → (n, d) tensors as the published code holds them: a list of per-sample dicts (views)."""
    n = next(iter(grads.values())).shape[0]
    return [{name: block[i] for name, block in grads.items()} for i in range(n)]


def plain_datainf(
    train: list[dict[str, torch.Tensor]], query: dict[str, torch.Tensor], damping: float = 0.1
) -> torch.Tensor:
    """Scores (n,) of every training sample against one query gradient (block → (d,))."""
    n = len(train)
    vectors = {}
    for name, v in query.items():
        sq_sum = 0.0
        for sample in train:  # λ = damping · mean ‖g‖² / d
            sq_sum += float(torch.sum(sample[name] ** 2))
        lam = damping * sq_sum / (n * v.numel())
        r = torch.zeros_like(v)
        for sample in train:  # r = (1/(nλ)) Σ_i (v − (vᵀg_i)/(λ + ‖g_i‖²) g_i)
            g = sample[name]
            coef = torch.sum(v * g) / (lam + torch.sum(g**2))
            r += (v - coef * g) / (n * lam)
        vectors[name] = r
    scores = torch.zeros(n)
    for i, sample in enumerate(train):
        total = 0.0
        for name, r in vectors.items():
            total += float(torch.sum(r * sample[name]))
        scores[i] = -total
    return scores
