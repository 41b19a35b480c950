"""Generation demo: the transformation data, the masked tokens, the build path on a tiny Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures import save_tiny_llama

from datainf_core.batching import IGNORE_INDEX
from datainf_core.demos import generation


def test_transformation_data_is_balanced_and_reproducible() -> None:
    train, test = generation.make_transformation_data(seed=3)
    assert len(generation.TRANSFORMATIONS) == 10
    assert len(train) == 900 and len(test) == 100
    assert set(train.columns) >= {"prompt", "response", "category"}
    assert train["category"].value_counts().eq(90).all()
    assert test["category"].value_counts().eq(10).all()
    again, _ = generation.make_transformation_data(seed=3)
    assert train.equals(again)
    other, _ = generation.make_transformation_data(seed=4)
    assert not train["prompt"].equals(other["prompt"])


@pytest.mark.parametrize(
    ("category", "expected"),
    [
        ("reverse_words", "cold river stone"),
        ("uppercase", "STONE RIVER COLD"),
        ("capitalise_words", "Stone River Cold"),
        ("replace_vowels", "st*n* r*v*r c*ld"),
        ("sort_words", "cold river stone"),
        ("reverse_letters", "enots revir dloc"),
        ("double_words", "stone stone river river cold cold"),
        ("initials", "SRC"),
        ("hyphenate", "stone-river-cold"),
        ("drop_every_other", "stone cold"),
    ],
)
def test_each_transformation(category: str, expected: str) -> None:
    _, transform = generation.TRANSFORMATIONS[category]
    assert transform(["stone", "river", "cold"]) == expected


def test_every_sample_states_its_instruction() -> None:
    train, _ = generation.make_transformation_data(seed=0, train_per_class=3, test_per_class=1)
    for row in train.itertuples():
        instruction, transform = generation.TRANSFORMATIONS[row.category]
        assert row.prompt.startswith(instruction)
        sentence = row.prompt.split("Sentence: ")[1].split("\n")[0]
        assert row.response == " " + transform(sentence.split())


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("gen_demo")
    base = save_tiny_llama(root / "base")
    project = generation.build_generation_demo(
        root / "demo", base=base, epochs=1, train_per_class=2, test_per_class=1
    )
    return project


def test_build_trains_on_responses_and_scores_prompts(tiny_demo) -> None:
    project = tiny_demo
    assert project.task == "generation"
    assert project.influence.loss_tokens == "prompt"  # the paper's setting
    assert project.data.category_column == "category"
    assert project.adapter_path is not None and project.adapter_path.exists()
    # A second call loads the finished build instead of training again.
    again = generation.build_generation_demo(project.root, base="unused")
    assert again.adapter_path == project.adapter_path


@pytest.mark.parametrize("loss_tokens", ["prompt", "response", "all"])
def test_the_right_tokens_are_masked(tiny_demo, loss_tokens: str) -> None:
    from datainf_core import data, models

    project = tiny_demo
    tokenizer = models.load_tokenizer(project)
    df = data.load_split(project, "train")
    examples = data.build_examples(project, df, tokenizer, loss_tokens=loss_tokens)
    for row, example in zip(df.itertuples(), examples, strict=True):
        n_prompt = len(tokenizer(row.prompt)["input_ids"])
        labels, ids = example["labels"], example["input_ids"]
        counted = labels != IGNORE_INDEX
        if loss_tokens == "prompt":
            assert counted[:n_prompt].all() and not counted[n_prompt:].any()
        elif loss_tokens == "response":
            assert not counted[:n_prompt].any() and counted[n_prompt:].all()
            assert int(ids[-1]) == tokenizer.eos_token_id
        else:
            assert counted.all()
        assert torch.equal(labels[counted], ids[counted])


def test_gradients_rerun_identically(tiny_demo) -> None:
    from datainf_core import data, gradients, models

    project = tiny_demo
    tokenizer = models.load_tokenizer(project)
    model = models.load_adapted_model(project, device="cpu")
    examples = data.build_examples(project, data.load_split(project, "validation"), tokenizer)
    first = gradients.collect_gradients(model, examples, task="generation", device="cpu")
    second = gradients.collect_gradients(model, examples, task="generation", device="cpu")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_gguf_file_is_found_without_importing_the_wheel() -> None:
    folder = generation.smollm2_gguf_dir()
    assert (Path(folder) / generation.GGUF_FILE).exists()
