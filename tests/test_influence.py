"""Influence engine against dense float64 references with explicit inverses."""

from __future__ import annotations

import pytest
import torch
from tolerances import ENGINE_ATOL, ENGINE_RTOL

from datainf_core.influence import (
    FLOAT64_ELEMENTS,
    METHODS,
    LissaConvergenceWarning,
    compute_influence,
    compute_self_influence,
)


class LazyBlock:
    """A stand-in for the on-disk store's lazy block: only ``.shape`` and row slicing."""

    def __init__(self, data: torch.Tensor) -> None:
        self._data = data
        self.shape = tuple(data.shape)
        self.reads = 0

    def __getitem__(self, rows: slice) -> torch.Tensor:
        assert isinstance(rows, slice)
        self.reads += 1
        return self._data[rows].clone()


def make_grads(n: int, dims: list[int], seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"layer{i}.lora_{'AB'[i % 2]}": torch.randn(n, d, generator=gen) * scale * (1 + i)
        for i, d in enumerate(dims)
    }


def _unit(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    total = sum(g.double().square().sum(dim=1) for g in grads.values())
    return {k: (g.double() / total.sqrt()[:, None]) for k, g in grads.items()}


def reference(
    train: dict[str, torch.Tensor],
    query: dict[str, torch.Tensor],
    method: str,
    *,
    damping: float = 0.1,
    relative: bool = True,
    aggregate: str | None = "mean",
    unit_norm: bool = False,
    per_block: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Dense float64 scores, inverting every matrix explicitly."""
    if unit_norm:
        train, query = _unit(train), _unit(query)
    parts = {}
    for name in train:
        x, v = train[name].double(), query[name].double()  # n x d, m x d
        if aggregate == "mean":
            v = v.mean(dim=0, keepdim=True)
        n, d = x.shape
        lam = damping * x.square().sum().item() / (n * d) if relative else damping
        eye = torch.eye(d, dtype=torch.float64)
        if method == "datainf":
            if d <= 64:  # (1/n) Σ_i (g_i g_iᵀ + λI)⁻¹, each inverted explicitly
                inv = sum(torch.linalg.inv(torch.outer(g, g) + lam * eye) for g in x) / n
            else:  # the same by Sherman–Morrison, summed over samples in float64
                weights = 1.0 / (lam + x.square().sum(dim=1))  # n
                inv = (eye - (x * weights[:, None]).T @ x / n) / lam
        elif method in ("exact", "lissa"):
            inv = torch.linalg.inv(x.T @ x / n + lam * eye)
        else:
            inv = eye
        r = v @ inv  # m x d
        parts[name] = -(r @ x.T)  # m x n
    if aggregate == "mean":
        parts = {k: p[0] for k, p in parts.items()}
    if per_block:
        return parts
    return sum(parts.values())


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32
    expected = expected.to(torch.float32) if expected.dtype != torch.float32 else expected
    scale = float(expected.abs().max())
    torch.testing.assert_close(
        actual, expected, rtol=ENGINE_RTOL, atol=max(ENGINE_ATOL, ENGINE_RTOL * 1e-2 * scale)
    )
    rel = float(torch.linalg.vector_norm(actual.double() - expected.double()))
    assert rel <= ENGINE_RTOL * float(torch.linalg.vector_norm(expected.double()))


CASES = [
    # n, block dims, m
    (40, [6], 1),  # d < n, one block, one query
    (50, [5, 9, 3], 4),  # d < n, many blocks, many queries
    (7, [20, 33], 3),  # d > n: the exact method takes its dual form
    (12, [12, 30, 4], 1),  # mixed
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("aggregate", ["mean", None])
def test_methods_match_dense_reference(method, case, aggregate):
    n, dims, m = case
    seed = hash((method, n, aggregate)) % 10_000
    train, query = make_grads(n, dims, seed), make_grads(m, dims, seed + 1)
    scores = compute_influence(
        train, query, method=method, aggregate=aggregate, lissa_iterations=3000
    )
    expected = reference(train, query, method, aggregate=aggregate)
    assert scores.shape == ((n,) if aggregate == "mean" else (m, n))
    assert_close(scores, expected)


@pytest.mark.parametrize("method", METHODS)
def test_absolute_damping_and_unit_norm(method):
    train, query = make_grads(30, [8, 5], 11, scale=0.3), make_grads(3, [8, 5], 12)
    for kwargs in ({"damping": 0.05, "relative": False}, {"unit_norm": True}):
        relative = kwargs.pop("relative", True)
        got = compute_influence(
            train,
            query,
            method=method,
            damping_mode="relative" if relative else "absolute",
            aggregate=None,
            lissa_iterations=3000,
            **kwargs,
        )
        assert_close(
            got, reference(train, query, method, aggregate=None, relative=relative, **kwargs)
        )


@pytest.mark.parametrize("method", ["datainf", "hessian_free", "exact"])
def test_float32_path_matches_reference(method):
    # Large enough that the engine runs its float32 products (the fast path).
    n, dims = 2600, [450, 400]
    assert n * sum(dims) > FLOAT64_ELEMENTS
    train, query = make_grads(n, dims, 3), make_grads(2, dims, 4)
    for aggregate in ("mean", None):
        got = compute_influence(train, query, method=method, aggregate=aggregate)
        assert_close(got, reference(train, query, method, aggregate=aggregate))


def test_datainf_equals_exact_for_one_sample():
    train, query = make_grads(1, [7, 3], 5), make_grads(4, [7, 3], 6)
    datainf = compute_influence(train, query, method="datainf", aggregate=None)
    exact = compute_influence(train, query, method="exact", aggregate=None)
    assert_close(datainf, exact)


def test_datainf_error_shrinks_with_block_dimension():
    # Theorem 1 of the DataInf paper: the closed form's error grows with the block dimension.
    errors = []
    for d in (2, 8, 32, 128):
        err = 0.0
        for seed in range(3):
            train = make_grads(200, [d], 100 * d + seed, scale=0.1)
            query = make_grads(1, [d], seed)
            kwargs = {"damping": 1.0, "damping_mode": "absolute"}
            exact = compute_influence(train, query, method="exact", **kwargs)
            datainf = compute_influence(train, query, method="datainf", **kwargs)
            err += float((datainf - exact).norm() / exact.norm())
        errors.append(err / 3)
    assert errors == sorted(errors), errors
    assert errors[0] < 0.1 * errors[-1]


@pytest.mark.parametrize("method", METHODS)
def test_chunked_lazy_equals_whole(method):
    train, query = make_grads(23, [9, 4, 30], 21), make_grads(5, [9, 4, 30], 22)
    whole = compute_influence(train, query, method=method, aggregate=None, unit_norm=True)
    lazy = {k: LazyBlock(v) for k, v in train.items()}
    chunked = compute_influence(
        lazy, query, method=method, aggregate=None, unit_norm=True, chunk_size=4
    )
    assert_close(chunked, whole)
    assert all(block.reads >= 6 for block in lazy.values())


def test_exact_block_groups_under_small_budget():
    train, query = make_grads(40, [10, 12, 8], 31), make_grads(2, [10, 12, 8], 32)
    whole = compute_influence(train, query, method="exact", unit_norm=True)
    # 1,200 bytes of budget leaves room for one block's 10 x 10 state at a time.
    grouped = compute_influence(
        train, query, method="exact", unit_norm=True, chunk_size=16, memory_budget_bytes=2400
    )
    assert_close(grouped, whole)


@pytest.mark.parametrize("method", METHODS)
def test_mean_of_rows_equals_aggregate(method):
    train, query = make_grads(25, [6, 11], 41), make_grads(6, [6, 11], 42)
    rows = compute_influence(train, query, method=method, aggregate=None)
    mean = compute_influence(train, query, method=method, aggregate="mean")
    assert_close(mean, rows.mean(dim=0))


def test_per_block_sums_to_total_and_matches_reference():
    train, query = make_grads(20, [5, 7, 3], 51), make_grads(3, [5, 7, 3], 52)
    for aggregate in ("mean", None):
        parts = compute_influence(train, query, per_block=True, aggregate=aggregate)
        total = compute_influence(train, query, aggregate=aggregate)
        assert set(parts) == set(train)
        assert_close(sum(parts.values()), total)
        expected = reference(train, query, "datainf", aggregate=aggregate, per_block=True)
        for name in train:
            assert_close(parts[name], expected[name])


def test_out_sink_receives_tiles_and_progress_reaches_total():
    train, query = make_grads(17, [6, 5], 61), make_grads(3, [6, 5], 62)
    full = compute_influence(train, query, aggregate=None)
    got = torch.full_like(full, float("nan"))
    calls = []

    def sink(query_slice, train_slice, tile):
        assert tile.shape == (
            query_slice.stop - query_slice.start,
            train_slice.stop - train_slice.start,
        )
        got[query_slice, train_slice] = tile

    result = compute_influence(
        train,
        query,
        aggregate=None,
        chunk_size=5,
        out=sink,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert result is None
    assert_close(got, full)
    assert calls[-1][0] == calls[-1][1] == 3 * 4  # 3 passes (relative damping) x 4 chunks


def test_scores_sign_harmful_is_positive():
    # A training sample whose gradient opposes the query's raises the query loss when up-weighted.
    query = {"w": torch.tensor([[1.0, 0.0, 0.0]])}
    train = {"w": torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])}
    for method in METHODS:
        scores = compute_influence(train, query, method=method, damping=0.1)
        assert scores[0] > 0 > scores[1], (method, scores)


def test_lissa_warns_when_not_converged():
    train, query = make_grads(10, [40], 71), make_grads(1, [40], 72)
    with pytest.warns(LissaConvergenceWarning, match="lissa_iterations"):
        compute_influence(train, query, method="lissa", lissa_iterations=2)


def test_lissa_warns_once_per_call_over_many_blocks():
    train, query = make_grads(10, [40, 30, 20], 73), make_grads(1, [40, 30, 20], 74)
    with pytest.warns(LissaConvergenceWarning) as record:
        compute_influence(train, query, method="lissa", lissa_iterations=2)
    messages = [str(w.message) for w in record if w.category is LissaConvergenceWarning]
    assert len(messages) == 1 and "3 of 3 blocks" in messages[0]


def test_lissa_with_explicit_scale_converges():
    train, query = make_grads(60, [8], 73), make_grads(2, [8], 74)
    top = float(
        torch.linalg.eigvalsh(
            train["layer0.lora_A"].double().T @ train["layer0.lora_A"].double() / 60
        ).max()
    )
    got = compute_influence(
        train, query, method="lissa", lissa_scale=1.5 * top, lissa_iterations=4000
    )
    assert_close(got, reference(train, query, "exact"))


def self_influence_reference(train, damping=0.1, unit_norm=False):
    if unit_norm:
        train = _unit(train)
    total = 0
    for x in train.values():
        x = x.double()
        n, d = x.shape
        lam = damping * x.square().sum().item() / (n * d)
        eye = torch.eye(d, dtype=torch.float64)
        inv = sum(torch.linalg.inv(torch.outer(g, g) + lam * eye) for g in x) / n
        total = total + ((x @ inv) * x).sum(dim=1)
    return total


@pytest.mark.parametrize("case", [(30, [5, 8]), (6, [20, 9])])
@pytest.mark.parametrize("unit_norm", [False, True])
def test_self_influence_matches_reference(case, unit_norm):
    n, dims = case
    train = make_grads(n, dims, 81)
    lazy = {k: LazyBlock(v) for k, v in train.items()}
    got = compute_self_influence(lazy, unit_norm=unit_norm, chunk_size=4)
    assert got.shape == (n,)
    assert_close(got, self_influence_reference(train, unit_norm=unit_norm).float())
    assert bool((got > 0).all())


def test_returns_float32_on_input_device():
    train = {k: v.double() for k, v in make_grads(9, [4], 91).items()}
    query = make_grads(2, [4], 92)
    scores = compute_influence(train, query)
    assert scores.dtype == torch.float32 and scores.device == query["layer0.lora_A"].device


BAD = [
    ("missing", "lacks block 'layer1.lora_B'"),
    ("extra", "has block 'extra.weight'"),
    ("dims", "block 'layer1.lora_B' has 5 dims in train_grads but 6"),
    ("n0", "n = 0"),
    ("nan", "block 'layer1.lora_B' has NaN or inf values in sample 3"),
    ("inf_query", "query gradient block 'layer0.lora_A' has NaN or inf"),
    ("method", "method should be one of"),
    ("damping", "damping should be a positive number"),
]


@pytest.mark.parametrize("kind,message", BAD)
@pytest.mark.parametrize("method", ["datainf", "exact", "hessian_free"])
def test_bad_input_raises_value_error(kind, message, method):
    train, query = make_grads(8, [4, 5], 1), make_grads(2, [4, 5], 2)
    kwargs = {"method": method}
    if kind == "missing":
        del query["layer1.lora_B"]
    elif kind == "extra":
        query["extra.weight"] = torch.zeros(2, 3)
    elif kind == "dims":
        query["layer1.lora_B"] = torch.zeros(2, 6)
    elif kind == "n0":
        train = {k: v[:0] for k, v in train.items()}
    elif kind == "nan":
        train["layer1.lora_B"][3, 2] = float("nan")
    elif kind == "inf_query":
        query["layer0.lora_A"][1, 0] = float("inf")
    elif kind == "method":
        kwargs["method"] = "newton"
    elif kind == "damping":
        kwargs["damping"] = -1.0
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        compute_influence(train, query, **kwargs)


def test_all_zero_block_adds_nothing():
    train, query = make_grads(10, [4, 5], 3), make_grads(2, [4, 5], 4)
    zeroed = dict(train, **{"layer0.lora_A": torch.zeros(10, 4)})
    only = {"layer1.lora_B": train["layer1.lora_B"]}
    query_only = {"layer1.lora_B": query["layer1.lora_B"]}
    got = compute_influence(zeroed, query, aggregate=None)
    assert_close(got, compute_influence(only, query_only, aggregate=None))


def test_self_influence_rejects_nan():
    train = make_grads(8, [4, 5], 1)
    train["layer0.lora_A"][5, 0] = float("inf")
    with pytest.raises(ValueError, match="block 'layer0.lora_A' has NaN or inf values in sample 5"):
        compute_self_influence(train)


def test_projection_is_seeded_and_keeps_inner_products():
    from datainf_core.projection import make_projection

    grads = make_grads(50, [3000, 20], 101)
    proj = make_projection(grads, dim=1024, seed=7)
    again = make_projection({k: v.shape[1] for k, v in grads.items()}, dim=1024, seed=7)
    projected = proj.apply(grads)
    assert projected["layer0.lora_A"].shape == (50, 1024)
    torch.testing.assert_close(projected["layer1.lora_B"], grads["layer1.lora_B"])  # d ≤ dim
    torch.testing.assert_close(projected["layer0.lora_A"], again.apply(grads)["layer0.lora_A"])
    other = make_projection(grads, dim=1024, seed=8).apply(grads)["layer0.lora_A"]
    assert not torch.allclose(other, projected["layer0.lora_A"])
    x = grads["layer0.lora_A"].double()
    y = projected["layer0.lora_A"].double()
    gram, gram_p = x @ x.T, y @ y.T
    norms = x.norm(dim=1)
    spread = ((gram_p - gram) / torch.outer(norms, norms)).abs().max()
    assert spread < 6 * (2 / 1024) ** 0.5
    lazy = proj.apply({k: LazyBlock(v) for k, v in grads.items()})
    assert lazy["layer0.lora_A"].shape == (50, 1024)
    torch.testing.assert_close(lazy["layer0.lora_A"][10:20], projected["layer0.lora_A"][10:20])
    scores = compute_influence(lazy, proj.apply(make_grads(2, [3000, 20], 102)), chunk_size=16)
    assert scores.shape == (50,) and bool(torch.isfinite(scores).all())
