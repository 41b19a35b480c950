"""The text demo's data generator: columns, labels, the noise protocol, determinism."""

import numpy as np
import pytest

from datainf_core.demos import text


def test_columns_sizes_and_labels() -> None:
    train, validation = text.generate_text_data(400, noise=0.2, seed=0)
    assert list(train.columns) == ["text", "label", "domain", "clean_label", "is_noisy"]
    assert list(validation.columns) == ["text", "label", "domain"]
    assert len(train) == 400 and len(validation) == 100
    assert set(train["label"]) == set(text.LABELS) == set(validation["label"])
    assert set(train["domain"]) == set(text.DOMAINS)
    assert train["is_noisy"].dtype == bool
    # Every sentence is distinct, across both splits too.
    all_text = list(train["text"]) + list(validation["text"])
    assert len(set(all_text)) == len(all_text)
    # Roughly balanced clean labels.
    assert 0.4 < (train["clean_label"] == "positive").mean() < 0.6


@pytest.mark.parametrize("noise", [0.0, 0.2, 0.35])
def test_noise_rate_and_flips_are_exact(noise: float) -> None:
    train, _ = text.generate_text_data(300, noise=noise, seed=1)
    flipped = train["label"] != train["clean_label"]
    assert (flipped == train["is_noisy"]).all()
    assert int(train["is_noisy"].sum()) == round(noise * 300)


def test_deterministic_per_seed() -> None:
    a, va = text.generate_text_data(120, seed=3)
    b, vb = text.generate_text_data(120, seed=3)
    c, _ = text.generate_text_data(120, seed=4)
    assert a.equals(b) and va.equals(vb)
    assert not a["text"].equals(c["text"])


def test_flip_labels_multiclass_never_keeps_the_class() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=500)
    noisy, is_noisy = text.flip_labels(labels, 0.3, rng, num_classes=4)
    assert is_noisy.sum() == 150
    assert (noisy[is_noisy] != labels[is_noisy]).all()
    assert (noisy[~is_noisy] == labels[~is_noisy]).all()
    assert len(set(noisy[is_noisy] - labels[is_noisy])) > 1  # not always the same shift
    with pytest.raises(ValueError, match="noise"):
        text.flip_labels(labels, 1.0, rng, num_classes=4)


def test_not_trivially_separable() -> None:
    """No single word decides the label: the best one-word rule stays well below perfect."""
    train, _ = text.generate_text_data(1500, noise=0.0, seed=2)
    y = (train["clean_label"] == "positive").to_numpy()
    words = train["text"].str.lower().str.replace(r"[^a-z' ]", " ", regex=True).str.split()
    vocab = {w for ws in words for w in ws}
    best = 0.0
    for word in vocab:
        has = np.array([word in ws for ws in words])
        if has.sum() < 20:
            continue
        best = max(best, (has == y).mean(), (has != y).mean())
    assert best < 0.75
    # Negation, contrast and filler all occur.
    joined = " ".join(train["text"])
    for marker in ("not", "but", "although", "We went on a Tuesday evening."):
        assert marker in joined


def test_generate_rejects_tiny_size() -> None:
    with pytest.raises(ValueError, match="size"):
        text.generate_text_data(5)


def test_build_text_demo_writes_project_and_adapter(tmp_path, monkeypatch) -> None:
    """The whole build on a tiny random BERT standing in for MiniLM (one short epoch)."""
    from fixtures import save_tiny_bert

    from datainf_core.project import load_project
    from datainf_core.train import TrainSettings

    base = save_tiny_bert(tmp_path / "base")
    monkeypatch.setattr(text, "minilm_path", lambda: base)
    calls = []
    settings = TrainSettings(epochs=1, batch_size=16, patience=None)
    text.build_text_demo(
        tmp_path / "demo",
        size=40,
        seed=0,
        settings=settings,
        progress=lambda *args: calls.append(args),
    )
    project = load_project(tmp_path / "demo")
    assert project.task == "classification" and project.data.labels == text.LABELS
    assert project.data.category_column == "domain"
    assert (project.adapter_path / "adapter_model.safetensors").is_file()
    import pandas as pd

    train = pd.read_csv(project.train_path)
    assert int(train["is_noisy"].sum()) == 8
    assert len(pd.read_csv(project.validation_path)) == 100
    assert calls[-1][0] == calls[-1][1]
    # The documented default: influence runs use the classifier head's tensors only.
    assert project.influence.include == text.INFLUENCE_INCLUDE
    from datainf_core.gradients import adapter_parameters
    from datainf_core.models import load_adapted_model

    model = load_adapted_model(project)
    chosen = adapter_parameters(model, project.influence.include)
    assert chosen and all("classifier" in name for name in chosen)
    assert len(chosen) < len(adapter_parameters(model))


def test_demo_train_settings_regimes() -> None:
    default = text.demo_train_settings(seed=3)
    overfit = text.demo_train_settings(seed=3, overfit=True)
    assert default.rank == overfit.rank == 8 and default.alpha == 16
    assert default.patience is not None and default.restore_best
    assert overfit.patience is None and not overfit.restore_best
    assert overfit.stop_at_train_accuracy is not None and overfit.seed == 3
    # A higher rate than the default's (2e-3) never left chance level on the 2,000-sample demo.
    assert overfit.lr <= default.lr
