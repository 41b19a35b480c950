"""Evaluation functions against hand-computed cases, pairwise loops and scikit-learn."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from tolerances import ENGINE_ATOL

from datainf_core import evaluate


def pairwise_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """The AUC as the share of (positive, negative) pairs ordered right, ties one half."""
    pos, neg = score[positive], score[~positive]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (pos.size * neg.size)


def test_detection_auc_hand_case() -> None:
    # noisy 0.9, 0.2 vs clean 0.8, 0.1: pairs won 1 + 1 + 0 + 1 = 3 of 4.
    assert evaluate.detection_auc([0.9, 0.8, 0.1, 0.2], [True, False, False, True]) == 0.75
    assert evaluate.detection_auc([1.0, 1.0], [True, False]) == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_auc_matches_pairwise_loop_and_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.random(60) < 0.3
    score = np.round(rng.normal(size=60) + truth, 1)  # rounding makes ties
    auc = evaluate.detection_auc(torch.tensor(score), truth)
    assert auc == pytest.approx(pairwise_auc(score, truth), abs=ENGINE_ATOL)
    assert auc == pytest.approx(roc_auc_score(truth, score), abs=ENGINE_ATOL)


def test_detection_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        evaluate.detection_auc([1.0, 2.0], [True])
    with pytest.raises(ValueError, match="both noisy and clean"):
        evaluate.detection_auc([1.0, 2.0], [False, False])
    with pytest.raises(ValueError, match="NaN"):
        evaluate.detection_auc([np.nan, 2.0], [True, False])


def test_detection_curve_hand_case() -> None:
    curve = evaluate.detection_curve([3.0, 1.0, 2.0, 0.0], [True, False, True, False])
    assert curve["fraction_inspected"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve["fraction_found"].tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]


def test_detection_curve_area_tracks_auc() -> None:
    rng = np.random.default_rng(3)
    truth = rng.random(200) < 0.2
    score = rng.normal(size=200) + 2 * truth
    curve = evaluate.detection_curve(score, truth)
    assert curve["fraction_found"].is_monotonic_increasing
    assert curve["fraction_found"].iloc[-1] == 1.0
    # A perfect signal finds everything after inspecting the noise rate.
    perfect = evaluate.detection_curve(truth.astype(float), truth)
    k = int(truth.sum())
    assert perfect["fraction_found"].iloc[k] == 1.0


def test_rank_correlation_is_spearman() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=50)
    signals = pd.DataFrame(
        {"train_index": np.arange(50), "a": a, "b": a**3, "c": -a, "d": rng.normal(size=50)}
    )
    corr = evaluate.rank_correlation(signals)
    assert list(corr.columns) == ["a", "b", "c", "d"]
    assert corr.loc["a", "b"] == pytest.approx(1.0)
    assert corr.loc["a", "c"] == pytest.approx(-1.0)
    from scipy.stats import spearmanr

    assert corr.loc["a", "d"] == pytest.approx(spearmanr(a, signals["d"]).statistic)


def test_combined_ranking_weights_and_sign() -> None:
    signals = pd.DataFrame(
        {
            "train_index": [0, 1, 2, 3],
            "train_loss": [0.1, 0.4, 0.3, 0.2],  # pct ranks .25 1 .75 .5
            "datainf": [4.0, 1.0, 3.0, 2.0],  # pct ranks 1 .25 .75 .5
        }
    )
    even = evaluate.combined_ranking(signals, weights={"train_loss": 1, "datainf": 1})
    np.testing.assert_allclose(even.to_numpy(), [0.625, 0.625, 0.75, 0.5])
    only_loss = evaluate.combined_ranking(signals, weights={"train_loss": 1.0, "absent": 2.0})
    np.testing.assert_allclose(only_loss.to_numpy(), [0.25, 1.0, 0.75, 0.5])
    # A negative weight reverses the signal: datainf upside down has pct ranks .25 1 .5 .75.
    reversed_ = evaluate.combined_ranking(signals, weights={"train_loss": 1, "datainf": -1})
    np.testing.assert_allclose(reversed_.to_numpy(), [0.25, 1.0, 0.625, 0.625])
    # The default weights: no unit-norm signal here, so the training loss alone.
    assert evaluate.combined_weights(["train_loss", "datainf"]) == {"train_loss": 1.0}
    default = evaluate.combined_ranking(signals)
    assert default.name == "combined"
    np.testing.assert_allclose(default.to_numpy(), only_loss.to_numpy())
    with pytest.raises(ValueError, match="weight != 0"):
        evaluate.combined_ranking(signals, weights={"absent": 1.0})


def test_combined_weights_prefer_unit_norm_signals() -> None:
    everything = [
        "datainf",
        "datainf_cosine",
        "hessian_free_cosine",
        "self_influence",
        "train_loss",
    ]
    assert evaluate.combined_weights([*everything, "combined"]) == {
        "datainf_cosine": 1 / 3,
        "hessian_free_cosine": 1 / 3,
        "self_influence": 1 / 3,
    }
    assert evaluate.combined_weights(["datainf_cosine", "train_loss"]) == {"datainf_cosine": 1.0}
    assert evaluate.combined_weights(["datainf", "self_influence", "train_loss"]) == {
        "train_loss": 0.5,
        "self_influence": 0.5,
    }
    assert evaluate.combined_weights(["datainf", "lissa"]) == {"datainf": 0.5, "lissa": 0.5}
    with pytest.raises(ValueError, match="at least one"):
        evaluate.combined_weights(["combined"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_combined_ranking_matches_a_loop(seed: int) -> None:
    """The default ranking: the mean of the chosen signals' percentile ranks, by a loop."""
    rng = np.random.default_rng(seed)
    n = 40
    signals = pd.DataFrame({"train_index": np.arange(n)})
    chosen = ("datainf_cosine", "hessian_free_cosine", "self_influence")
    for name in ("datainf", *chosen, "train_loss"):
        signals[name] = np.round(rng.normal(size=n), 1)  # rounding makes ties
    expected = np.zeros(n)
    for name in chosen:
        values = signals[name].to_numpy()
        for i in range(n):  # percentile rank with ties averaged: (#below + (#equal + 1) / 2) / n
            below, equal = (values < values[i]).sum(), (values == values[i]).sum()
            expected[i] += (below + (equal + 1) / 2) / n / len(chosen)
    got = evaluate.combined_ranking(signals).to_numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=ENGINE_ATOL)


def test_fit_check_hand_case_and_errors() -> None:
    fit = evaluate.fit_check([0.2, 0.4], torch.tensor([0.6, 0.6, 0.6]))
    assert fit == {
        "train_loss_mean": 0.3,
        "validation_loss_mean": 0.6,
        "ratio": 0.5,
        "fits_training_better": True,
    }
    assert evaluate.fit_check([0.9], [0.3])["fits_training_better"] is False
    with pytest.raises(ValueError, match="non-empty and finite"):
        evaluate.fit_check([], [0.3])
    with pytest.raises(ValueError, match="non-empty and finite"):
        evaluate.fit_check([0.1], [np.nan])
    with pytest.raises(ValueError, match="positive"):
        evaluate.fit_check([0.1], [0.0])


def test_combined_ranking_skips_nan_per_sample() -> None:
    signals = pd.DataFrame({"train_loss": [0.1, 0.2, 0.3], "exact": [np.nan, 1.0, 0.0]})
    combined = evaluate.combined_ranking(signals, weights={"train_loss": 1, "exact": 1})
    # sample 0 only has its train_loss rank (1/3); the others average both.
    np.testing.assert_allclose(combined.to_numpy(), [1 / 3, (2 / 3 + 1.0) / 2, (1.0 + 0.5) / 2])


def test_identification_hand_case() -> None:
    train_cat = np.array(["a", "a", "b", "b"])
    scores = np.array(
        [
            [-2.0, -1.0, 0.5, 1.0],  # query a: both a's most helpful → AUC 1, recall 1
            [-2.0, 1.0, -1.0, 0.0],  # query b: helpful order 0(a), 2(b), 3(b), 1(a)
        ]
    )
    out = evaluate.identification_metrics(scores, train_cat, np.array(["a", "b"]))
    # query b: -score b's = 1, 0 ; a's = 2, -1 → pairs: (1>2)0 (1>-1)1 (0>2)0 (0>-1)1 → 0.5;
    # top-2 helpful = {0, 2} → 1 of 2 same-category.
    assert out["auc_mean"] == pytest.approx(0.75)
    assert out["auc_std"] == pytest.approx(0.25)
    assert out["recall_mean"] == pytest.approx(0.75)
    assert out["recall_std"] == pytest.approx(0.25)
    assert out["n_queries"] == 2 and out["n_skipped"] == 0
    top1 = evaluate.identification_metrics(scores, train_cat, np.array(["a", "b"]), k=1)
    assert top1["recall_mean"] == pytest.approx(0.5)  # query a hit, query b missed


@pytest.mark.parametrize("seed", [0, 1])
def test_identification_matches_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    train_cat = rng.integers(0, 3, size=30)
    query_cat = np.array([0, 1, 2, 1, 5])  # category 5 has no training sample → skipped
    scores = rng.normal(size=(5, 30)) - (train_cat[None, :] == query_cat[:, None])
    out = evaluate.identification_metrics(torch.tensor(scores), train_cat, query_cat)
    aucs, recalls = [], []
    for j in range(4):
        same = train_cat == query_cat[j]
        aucs.append(pairwise_auc(-scores[j], same))
        top = np.argsort(scores[j])[: same.sum()]
        recalls.append(same[top].mean())
    assert out["n_skipped"] == 1
    assert out["auc_mean"] == pytest.approx(np.mean(aucs), abs=ENGINE_ATOL)
    assert out["auc_std"] == pytest.approx(np.std(aucs), abs=ENGINE_ATOL)
    assert out["recall_mean"] == pytest.approx(np.mean(recalls), abs=ENGINE_ATOL)


def test_identification_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        evaluate.identification_metrics(np.zeros((2, 3)), [0, 1], [0, 1])


def test_evaluate_signals_report_is_json() -> None:
    rng = np.random.default_rng(5)
    n = 80
    truth = rng.random(n) < 0.25
    truth[:2] = [True, False]
    train_df = pd.DataFrame({"is_noisy": truth, "topic": rng.integers(0, 2, size=n)})
    order = rng.permutation(n)  # signals rows in another order than the file
    signals = pd.DataFrame(
        {
            "train_index": order,
            "train_loss": truth[order] + rng.normal(scale=0.5, size=n),
            "datainf": truth[order] + rng.normal(scale=1.0, size=n),
        }
    )
    val_df = pd.DataFrame({"topic": [0, 1, 0]})
    per_query = pd.DataFrame(
        [
            {"query_index": q, "train_index": t, "method": "datainf", "score": rng.normal()}
            for q in range(3)
            for t in range(n)
        ]
    )
    report = evaluate.evaluate_signals(
        signals, train_df, per_query=per_query, validation_df=val_df, category_column="topic"
    )
    json.dumps(report)
    assert set(report["detection_auc"]) == {"train_loss", "datainf", "combined"}
    assert report["detection_auc"]["train_loss"] == pytest.approx(
        roc_auc_score(truth[order], signals["train_loss"])
    )
    assert report["best_single"]["signal"] == "train_loss"
    assert report["combined_gap"] == pytest.approx(
        report["detection_auc"]["train_loss"] - report["detection_auc"]["combined"]
    )
    assert report["noise_rate"] == pytest.approx(truth.mean())
    assert set(report["identification"]) == {"datainf"}
    assert len(report["detection_curve"]["datainf"]["fraction_found"]) == 21
    no_truth = evaluate.evaluate_signals(signals, train_df.drop(columns="is_noisy"))
    assert "detection_auc" not in no_truth and "rank_correlation" in no_truth
