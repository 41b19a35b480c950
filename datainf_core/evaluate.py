"""Evaluation of mislabel signals and influence scores when the truth is known.

Two protocols:

- *Detection* (the paper's mislabeled-data detection): each signal ranks the training samples, the
  most suspicious first (higher = more suspicious, matching the score convention of
  ARCHITECTURE.md: positive = harmful). The ROC-AUC against ``is_noisy`` and the detection curve
  (share of flipped labels found vs share of the training set inspected) measure it.
- *Identification* (the paper's Table 2): for each query, the training samples of the query's own
  category should be the most helpful ones, i.e. carry the most negative scores. The ROC-AUC of
  "same category" against the negated score and the recall of same-category samples among the
  ``k`` most helpful measure it, averaged over queries.

``combined_ranking`` is the default review ranking of the app and the CLI.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

logger = logging.getLogger(__name__)

INDEX_COLUMN = "train_index"
COMBINED_COLUMN = "combined"
TRAIN_LOSS_COLUMN = "train_loss"
SELF_INFLUENCE_COLUMN = "self_influence"
UNIT_NORM_SUFFIX = "_cosine"


def _as_1d(values: Any, name: str) -> np.ndarray:
    """Converts a sequence, Series, NumPy array or torch tensor to a 1-D float64 array."""
    if hasattr(values, "detach"):  # torch.Tensor without importing torch
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} should be one-dimensional, got shape {array.shape}")
    return array


def _check_detection_inputs(signal: Any, is_noisy: Any) -> tuple[np.ndarray, np.ndarray]:
    score = _as_1d(signal, "signal")
    truth = _as_1d(is_noisy, "is_noisy").astype(bool)
    if score.shape != truth.shape:
        raise ValueError(
            f"signal and is_noisy should have the same length, got {score.size} and {truth.size}"
        )
    if not np.isfinite(score).all():
        bad = int((~np.isfinite(score)).sum())
        raise ValueError(f"signal has {bad} NaN/inf values; drop or fill them before evaluating")
    n_noisy = int(truth.sum())
    if n_noisy == 0 or n_noisy == truth.size:
        raise ValueError(
            f"detection needs both noisy and clean samples, got {n_noisy} noisy of {truth.size}"
        )
    return score, truth


def detection_auc(signal: Any, is_noisy: Any) -> float:
    """ROC-AUC of a mislabel signal against the known flipped labels.

    Args:
        signal: Shape ``(n,)``; higher = more suspicious.
        is_noisy: Shape ``(n,)`` booleans; True where the label was flipped.

    Returns:
        The AUC in [0, 1]; 0.5 is chance, ties count one half.
    """
    score, truth = _check_detection_inputs(signal, is_noisy)
    return float(roc_auc_score(truth, score))


def detection_curve(signal: Any, is_noisy: Any) -> pd.DataFrame:
    """Share of flipped labels found as the training set is inspected, most suspicious first.

    Args:
        signal: Shape ``(n,)``; higher = more suspicious.
        is_noisy: Shape ``(n,)`` booleans.

    Returns:
        ``n + 1`` rows with ``fraction_inspected`` (0, 1/n, ..., 1) and ``fraction_found`` (share of
        all flipped labels among the inspected samples). Ties keep the file order.
    """
    score, truth = _check_detection_inputs(signal, is_noisy)
    order = np.argsort(-score, kind="stable")  # most suspicious first
    found = np.concatenate([[0.0], np.cumsum(truth[order]) / truth.sum()])
    inspected = np.arange(score.size + 1, dtype=np.float64) / score.size
    return pd.DataFrame({"fraction_inspected": inspected, "fraction_found": found})


def signal_columns(signals: pd.DataFrame) -> list[str]:
    """The signal columns of a signals table: every numeric column except ``train_index``."""
    return [
        column
        for column in signals.columns
        if column != INDEX_COLUMN and pd.api.types.is_numeric_dtype(signals[column])
    ]


def rank_correlation(signals: pd.DataFrame) -> pd.DataFrame:
    """Spearman rank correlation between every pair of signals.

    Args:
        signals: ``train_index`` plus one numeric column per signal, ``n`` rows.

    Returns:
        A square DataFrame indexed and labelled by the signal names.
    """
    columns = signal_columns(signals)
    ranks = signals[columns].rank(method="average")
    return ranks.corr(method="pearson")  # Pearson on ranks = Spearman


def _percentile_ranks(values: pd.Series) -> pd.Series:
    """Ranks scaled to (0, 1], ties averaged; NaN stays NaN."""
    return values.rank(method="average", pct=True)


def combined_ranking(
    signals: pd.DataFrame, *, weights: dict[str, float] | None = None
) -> pd.Series:
    """The default review ranking: a weighted average of the signals' percentile ranks.

    Each signal is turned into percentile ranks (so scales do not matter) and the ranks are
    averaged with ``weights``. A negative weight uses the signal upside down (rank ``1 - r``)
    with the weight's magnitude, so the result stays a weighted average of ranks in (0, 1].
    ``weights=None`` uses :func:`combined_weights`. A signal missing from ``signals`` is
    skipped; NaN entries are skipped per sample.

    Args:
        signals: ``train_index`` plus one numeric column per signal; a ``combined`` column is
            ignored.
        weights: Signal name → weight (negative = reversed, 0 = unused); ``None`` = the default.

    Returns:
        Shape ``(n,)`` float Series aligned with ``signals``' index, named ``combined``; higher =
        more suspicious.
    """
    columns = [c for c in signal_columns(signals) if c != COMBINED_COLUMN]
    if not columns:
        raise ValueError("combined_ranking needs at least one signal column besides train_index")
    if weights is None:
        weights = combined_weights(columns)
    unknown = sorted(set(weights) - set(columns))
    if unknown:
        logger.debug("combined_ranking: weights for absent signals %s are skipped", unknown)
    used = {name: float(w) for name, w in weights.items() if name in columns and w != 0}
    if not used:
        raise ValueError(
            f"combined_ranking weights select none of the signals {columns}; give one a weight != 0"
        )
    ranks = pd.DataFrame(
        {
            name: _percentile_ranks(signals[name] if w > 0 else -signals[name])
            for name, w in used.items()
        }
    )
    weight_row = pd.Series({name: abs(w) for name, w in used.items()})
    present = ranks.notna()
    total = (ranks.fillna(0.0) * weight_row).sum(axis=1)
    norm = (present * weight_row).sum(axis=1)
    combined = (total / norm.where(norm > 0)).rename(COMBINED_COLUMN)
    return combined.astype(np.float64)


def combined_weights(columns: Sequence[str]) -> dict[str, float]:
    """The default weights of :func:`combined_ranking` for the signals a run has.

    Every unit-norm influence signal (``*_cosine``; runs always score ``datainf_cosine`` and
    ``hessian_free_cosine``, see :data:`datainf_core.runs.COMPANION_METHODS`) and self-influence
    get equal shares. Without a unit-norm signal, the training loss and self-influence share
    equally; without any of these, every signal does.

    Why: which signal detects flipped labels best depends on how far the model was trained, and
    only these stayed near the best in both regimes of the text demo (2 seeds each,
    ``bench/bench_text_demo.py``, BENCHMARKS.md section 3a). Stopped at the best validation loss,
    the training loss, self-influence and unit-norm DataInf were within 0.01 of one another;
    trained until it fit the flipped labels, the training loss and self-influence fell 0.04-0.06
    behind unit-norm DataInf, and plain DataInf and Hessian-free fell to chance or below (their
    scores grow with the gradient norm, which shrinks once a flipped label is fit). Self-influence
    adds a different kind of evidence (how unusual a sample is to the model, not how it moves the
    validation loss), which kept the average closest to the best signal across the four runs.
    Weights estimated from the signals' agreement (a spectral, SUMMA-style ensemble) were tried
    and failed: signals computed from the same gradients share their errors.

    Args:
        columns: The signal names present (``combined`` is ignored).

    Returns:
        Signal name → weight; the weights sum to one.
    """
    names = [c for c in columns if c != COMBINED_COLUMN]
    if not names:
        raise ValueError("combined_weights needs at least one signal name")
    unit_norm = [c for c in names if c.endswith(UNIT_NORM_SUFFIX)]
    if unit_norm:
        chosen = unit_norm + [c for c in (SELF_INFLUENCE_COLUMN,) if c in names]
    else:
        chosen = [c for c in (TRAIN_LOSS_COLUMN, SELF_INFLUENCE_COLUMN) if c in names] or names
    return dict.fromkeys(chosen, 1.0 / len(chosen))


def identification_metrics(
    scores: Any,
    train_categories: Any,
    query_categories: Any,
    k: int | None = None,
) -> dict[str, float]:
    """Per-query identification of same-category training samples (the paper's Table 2).

    For each query ``j``: the ROC-AUC of "train sample has the query's category" against the
    negated score ``-scores[j]`` (helpful = negative), and the recall of same-category samples among
    the ``k`` most helpful (most negative) training samples, i.e. hits / min(k, same-category
    count). Queries whose category is missing from the training set, or is its only category, have
    no AUC and are skipped (counted in ``n_skipped``).

    Args:
        scores: Shape ``(m, n)``: query ``j`` × training sample ``k``, array or tensor.
        train_categories: Shape ``(n,)`` category of each training sample.
        query_categories: Shape ``(m,)`` category of each query.
        k: Samples inspected per query; ``None`` uses the number of training samples of the
            query's category (the paper's choice when categories are balanced).

    Returns:
        ``auc_mean``, ``auc_std``, ``recall_mean``, ``recall_std`` (population std over queries),
        ``n_queries`` (evaluated) and ``n_skipped``.
    """
    if hasattr(scores, "detach"):
        scores = scores.detach().cpu().numpy()
    matrix = np.asarray(scores, dtype=np.float64)
    train_cat = np.asarray(train_categories)
    query_cat = np.asarray(query_categories)
    if matrix.ndim != 2 or matrix.shape != (query_cat.size, train_cat.size):
        raise ValueError(
            f"scores should have shape (queries, train) = ({query_cat.size}, {train_cat.size}), "
            f"got {matrix.shape}"
        )
    if k is not None and k < 1:
        raise ValueError(f"k should be a positive number of training samples, got {k}")
    aucs: list[float] = []
    recalls: list[float] = []
    for j in range(matrix.shape[0]):
        same = train_cat == query_cat[j]
        n_same = int(same.sum())
        if n_same == 0 or n_same == same.size:
            continue
        helpful = -matrix[j]  # n; larger = more helpful
        aucs.append(float(roc_auc_score(same, helpful)))
        top = min(k if k is not None else n_same, same.size)
        order = np.argsort(matrix[j], kind="stable")[:top]  # most helpful first
        recalls.append(float(same[order].sum()) / min(top, n_same))
    if not aucs:
        raise ValueError(
            "no query has a category that splits the training set; check the category columns"
        )
    return {
        "auc_mean": float(np.mean(aucs)),
        "auc_std": float(np.std(aucs)),
        "recall_mean": float(np.mean(recalls)),
        "recall_std": float(np.std(recalls)),
        "n_queries": len(aucs),
        "n_skipped": int(matrix.shape[0] - len(aucs)),
    }


def _curve_points(curve: pd.DataFrame, points: int = 21) -> dict[str, list[float]]:
    """The detection curve at ``points`` evenly spaced inspected fractions (JSON-friendly)."""
    grid = np.linspace(0.0, 1.0, points)
    found = np.interp(grid, curve["fraction_inspected"], curve["fraction_found"])
    return {"fraction_inspected": grid.round(4).tolist(), "fraction_found": found.round(4).tolist()}


def fit_check(train_losses: Any, validation_losses: Any) -> dict[str, Any]:
    """Whether the model fits its training samples better than held-out ones (no truth needed).

    With wrong labels in the training set, a model that generalises has a *higher* mean loss on
    its training samples (it disagrees with the wrong labels) than on a clean validation set; one
    that has memorised them has a *lower* one. On the text demo the ratio train / validation was
    1.83 and 1.88 when stopped at the best validation loss and 0.42 and 0.45 when trained until it
    fit the flipped labels (BENCHMARKS.md section 3a). Below 1, the training loss and
    self-influence lose power and plain DataInf and Hessian-free can rank flipped labels upside
    down; the unit-norm signals held up best.

    Args:
        train_losses: Shape ``(n,)`` per-sample training losses (given labels).
        validation_losses: Shape ``(m,)`` per-sample validation losses.

    Returns:
        ``train_loss_mean``, ``validation_loss_mean``, ``ratio`` (train / validation) and
        ``fits_training_better`` (ratio < 1).

    Raises:
        ValueError: Empty or non-finite losses, or a validation mean that is not positive.
    """
    train = _as_1d(train_losses, "train_losses")
    validation = _as_1d(validation_losses, "validation_losses")
    for name, values in (("train_losses", train), ("validation_losses", validation)):
        if values.size == 0 or not np.isfinite(values).all():
            raise ValueError(f"{name} must be non-empty and finite, got {values.size} values")
    train_mean, validation_mean = float(train.mean()), float(validation.mean())
    if validation_mean <= 0:
        raise ValueError(f"validation loss mean must be positive, got {validation_mean}")
    ratio = train_mean / validation_mean
    return {
        "train_loss_mean": round(train_mean, 6),
        "validation_loss_mean": round(validation_mean, 6),
        "ratio": round(ratio, 4),
        "fits_training_better": bool(ratio < 1.0),
    }


def fit_message(fit: Mapping[str, Any]) -> str:
    """One paragraph on ``evaluation.json``'s ``fit`` (:func:`fit_check`) for the CLI and the app."""
    ratio = float(fit["ratio"])
    head = (
        f"Fit check: mean training loss {float(fit['train_loss_mean']):.3f}, mean validation "
        f"loss {float(fit['validation_loss_mean']):.3f} (ratio {ratio:.2f})."
    )
    if fit.get("fits_training_better"):
        return (
            f"{head} The adapter fits its training samples better than held-out ones, so it may "
            "have memorised wrong labels or answers: the training loss and self-influence lose "
            "power, plain DataInf and Hessian-free can rank them upside down, and the unit-norm "
            "(cosine) signals held up best on our demo."
        )
    return (
        f"{head} The adapter does not fit its training samples better than held-out ones, so "
        "wrong labels still stand out by their loss: on our demo every signal but LiSSA and Exact "
        "detected them well."
    )


def evaluate_signals(
    signals: pd.DataFrame,
    train_df: pd.DataFrame,
    *,
    per_query: pd.DataFrame | None = None,
    validation_df: pd.DataFrame | None = None,
    category_column: str | None = None,
) -> dict[str, Any]:
    """Everything the known truth allows: detection per signal, rank correlation, identification.

    Detection needs an ``is_noisy`` column in ``train_df``; identification needs ``per_query``
    scores and a ``category_column`` present in both ``train_df`` and ``validation_df``. Whatever
    is not available is left out. A ``combined`` column is added (from :func:`combined_ranking`)
    when ``signals`` has none.

    Args:
        signals: ``train_index`` (row positions in ``train_df``) plus one column per signal.
        train_df: The training table, in file order.
        per_query: Optional ``query_index``, ``train_index``, ``method``, ``score`` rows.
        validation_df: The query table, needed with ``per_query``.
        category_column: Column holding each sample's category, for identification.

    Returns:
        A JSON-serialisable dict: ``n_train``, ``signals`` (names), ``combined_weights`` (the
        default weights of :func:`combined_ranking` for these signals), and where possible
        ``noise_rate``, ``detection_auc`` (signal → AUC), ``best_single`` (name, AUC),
        ``combined_gap`` (best single AUC − combined AUC), ``detection_curve`` (signal → 21
        points), ``rank_correlation`` (nested dict) and ``identification`` (method → metrics).
    """
    table = signals.copy()
    if COMBINED_COLUMN not in table.columns and signal_columns(table):
        table[COMBINED_COLUMN] = combined_ranking(table)
    names = signal_columns(table)
    result: dict[str, Any] = {"n_train": len(table), "signals": names}
    if [name for name in names if name != COMBINED_COLUMN]:
        result["combined_weights"] = {
            name: round(weight, 4) for name, weight in combined_weights(names).items()
        }
    if names and len(table) > 1:
        corr = rank_correlation(table)
        result["rank_correlation"] = {
            row: {col: round(float(corr.loc[row, col]), 4) for col in corr.columns}
            for row in corr.index
        }
    if "is_noisy" in train_df.columns and INDEX_COLUMN in table.columns:
        truth = train_df["is_noisy"].to_numpy(dtype=bool)[table[INDEX_COLUMN].to_numpy()]
        result["noise_rate"] = float(truth.mean())
        aucs: dict[str, float] = {}
        curves: dict[str, dict[str, list[float]]] = {}
        for name in names:
            values = table[name]
            if values.isna().any():
                logger.warning("signal %s has NaN values; it is left out of detection", name)
                continue
            aucs[name] = detection_auc(values, truth)
            curves[name] = _curve_points(detection_curve(values, truth))
        result["detection_auc"] = aucs
        result["detection_curve"] = curves
        singles = {name: auc for name, auc in aucs.items() if name != COMBINED_COLUMN}
        if singles:
            best = max(singles, key=lambda name: singles[name])
            result["best_single"] = {"signal": best, "auc": singles[best]}
            if COMBINED_COLUMN in aucs:
                result["combined_gap"] = singles[best] - aucs[COMBINED_COLUMN]
    has_categories = (
        validation_df is not None
        and category_column is not None
        and category_column in train_df.columns
        and category_column in validation_df.columns
    )
    if per_query is not None and has_categories:
        assert validation_df is not None and category_column is not None
        result["identification"] = _identification_by_method(
            per_query, train_df, validation_df, category_column
        )
    return result


def _identification_by_method(
    per_query: pd.DataFrame,
    train_df: pd.DataFrame,
    validation_df: pd.DataFrame,
    category_column: str,
) -> dict[str, dict[str, float]]:
    """Identification metrics for each method of a long-format per-query table."""
    out: dict[str, dict[str, float]] = {}
    for method, rows in per_query.groupby("method", sort=True):
        wide = rows.pivot(index="query_index", columns="train_index", values="score")  # m x n
        train_cat = train_df[category_column].to_numpy()[wide.columns.to_numpy()]
        query_cat = validation_df[category_column].to_numpy()[wide.index.to_numpy()]
        out[str(method)] = identification_metrics(wide.to_numpy(), train_cat, query_cat)
    return out
