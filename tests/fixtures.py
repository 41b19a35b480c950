"""Tiny offline projects for tests: a random BERT classifier and a random Llama, built from configs.

Each factory writes a base model folder (safetensors + tokenizer), a LoRA adapter saved by peft
(gaussian ``lora_A`` and a randomised ``lora_B``: peft zeroes B even with the gaussian init,
which would make every ``lora_A`` gradient zero), train and
validation files, and ``project.toml``; it returns the loaded :class:`Project`. Everything takes
well under a second or two on a CPU.

    from fixtures import make_tiny_classification_project  # tests/ is on sys.path under pytest
    project = make_tiny_classification_project(tmp_path, n_train=40, noise=0.2)
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from datainf_core.project import Project, create_project

POSITIVE = ["good", "great", "fine", "lovely", "superb", "happy", "nice", "excellent"]
NEGATIVE = ["bad", "awful", "poor", "sad", "terrible", "boring", "ugly", "dull"]
NEUTRAL = ["the", "film", "movie", "was", "a", "very", "plot", "and", "acting", "story", "is"]
TOPICS = ["sports", "science", "music"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _sentence(rng: random.Random, positive: bool) -> str:
    pool = POSITIVE if positive else NEGATIVE
    words = rng.sample(NEUTRAL, 3) + rng.sample(pool, 2)
    rng.shuffle(words)
    return " ".join(words)


def make_sentiment_table(
    n: int, *, noise: float = 0.0, seed: int = 0, with_category: bool = False
) -> pd.DataFrame:
    """Synthetic two-class sentiment rows: ``text``, ``label`` (negative/positive).

    With ``noise > 0`` a share of labels is flipped and the truth kept in ``is_noisy`` and
    ``clean_label`` (the paper's protocol).
    """
    rng = random.Random(seed)
    rows = []
    n_noisy = round(n * noise)
    noisy = set(rng.sample(range(n), n_noisy)) if n_noisy else set()
    for i in range(n):
        positive = i % 2 == 0
        clean = "positive" if positive else "negative"
        flipped = "negative" if positive else "positive"
        row = {"text": _sentence(rng, positive), "label": flipped if i in noisy else clean}
        if noise > 0:
            row["is_noisy"] = i in noisy
            row["clean_label"] = clean
        if with_category:
            row["category"] = clean
        rows.append(row)
    return pd.DataFrame(rows)


def save_tiny_bert(folder: Path, *, num_labels: int = 2, seed: int = 0) -> Path:
    """A 2-layer, 32-wide random BERT classifier and its word-level tokenizer in ``folder``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + sorted(set(POSITIVE + NEGATIVE + NEUTRAL + TOPICS))
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_lora_adapter(
    base_folder: Path,
    adapter_folder: Path,
    *,
    task: str = "classification",
    target_modules: tuple[str, ...] | None = None,
    rank: int = 4,
    seed: int = 0,
    num_labels: int = 2,
) -> Path:
    """A randomly initialised (gaussian) LoRA adapter on the base model in ``base_folder``."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            base_folder, num_labels=num_labels
        )
        task_type = TaskType.SEQ_CLS
        targets = list(target_modules or ("query", "value"))
    else:
        model = AutoModelForCausalLM.from_pretrained(base_folder)
        task_type = TaskType.CAUSAL_LM
        targets = list(target_modules or ("q_proj", "v_proj"))
    config = LoraConfig(
        task_type=task_type,
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=targets,
        init_lora_weights="gaussian",
    )
    peft_model = get_peft_model(model, config)
    # Gaussian init leaves B at zero only for the default init; nudge B so both factors matter.
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    peft_model.save_pretrained(adapter_folder)
    return adapter_folder


def make_tiny_classification_project(
    tmp_path: Path,
    n_train: int = 40,
    noise: float = 0.2,
    *,
    n_validation: int = 12,
    seed: int = 0,
    fmt: str = "csv",
    with_category: bool = False,
) -> Project:
    """A classification project on a tiny random BERT with a LoRA adapter on query/value.

    Train rows carry ``is_noisy``/``clean_label`` when ``noise > 0``; with ``with_category`` both
    splits get a ``category`` column (the clean label) for identification metrics.
    """
    root = Path(tmp_path) / "tiny_cls"
    base = save_tiny_bert(root / "base", seed=seed)
    save_lora_adapter(base, root / "adapter", seed=seed)
    train = make_sentiment_table(n_train, noise=noise, seed=seed, with_category=with_category)
    validation = make_sentiment_table(n_validation, seed=seed + 1, with_category=with_category)
    paths = {}
    for split, df in (("train", train), ("validation", validation)):
        path = root / f"{split}.{fmt}"
        if fmt == "csv":
            df.to_csv(path, index=False)
        elif fmt == "jsonl":
            df.to_json(path, orient="records", lines=True)
        else:
            df.to_parquet(path, index=False)
        paths[split] = path.name
    return create_project(
        root,
        name="tiny classification",
        task="classification",
        base="base",
        adapter="adapter",
        train=paths["train"],
        validation=paths["validation"],
        labels=["negative", "positive"],
        max_length=32,
        batch_size=8,
        category_column="category" if with_category else None,
    )


GEN_WORDS = ["hello", "world", "cats", "dogs", "run", "sleep", "what", "do", "like", "to", "?"]


def save_tiny_llama(folder: Path, *, seed: int = 0) -> Path:
    """A 2-layer, 32-wide random Llama and a word-level tokenizer (BOS prefix, EOS, PAD)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + GEN_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_generation_table(n: int, *, seed: int = 0, with_category: bool = True) -> pd.DataFrame:
    """Prompt/response rows over the tiny Llama vocabulary, with a ``category`` (the topic)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = "cats" if i % 2 == 0 else "dogs"
        verb = rng.choice(["run", "sleep"])
        row = {"prompt": f"what do {topic} like to do ?", "response": f"{topic} like to {verb}"}
        if with_category:
            row["category"] = topic
        rows.append(row)
    return pd.DataFrame(rows)


def make_tiny_generation_project(
    tmp_path: Path, n_train: int = 12, n_validation: int = 4, *, seed: int = 0
) -> Project:
    """A generation project on a tiny random Llama with a LoRA adapter on q_proj/v_proj."""
    root = Path(tmp_path) / "tiny_gen"
    base = save_tiny_llama(root / "base", seed=seed)
    save_lora_adapter(base, root / "adapter", task="generation", seed=seed)
    make_generation_table(n_train, seed=seed).to_json(
        root / "train.jsonl", orient="records", lines=True
    )
    make_generation_table(n_validation, seed=seed + 1).to_json(
        root / "validation.jsonl", orient="records", lines=True
    )
    return create_project(
        root,
        name="tiny generation",
        task="generation",
        base="base",
        adapter="adapter",
        train="train.jsonl",
        validation="validation.jsonl",
        max_length=32,
        batch_size=4,
        category_column="category",
    )
