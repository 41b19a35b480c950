"""data.py: every table format, bad files with one-line messages, validation, examples."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from fixtures import save_tiny_bert, save_tiny_llama

from datainf_core.data import build_examples, label_ids, load_split, load_table
from datainf_core.errors import DataError
from datainf_core.project import DataSettings, ModelSettings, Project

ROWS = pd.DataFrame(
    {"text": ["good film", "NA", "bad plot"], "label": ["positive", "negative", "negative"]}
)


def make_project(root: Path, train: str, *, task: str = "classification", **data) -> Project:
    columns = {
        "classification": {"text_column": "text", "label_column": "label"},
        "generation": {"prompt_column": "prompt", "response_column": "response"},
        "text-to-image": {"image_column": "image", "caption_column": "caption"},
    }[task]
    labels = ["negative", "positive"] if task == "classification" else None
    settings = {**columns, "labels": labels, **data}
    return Project(
        root=root,
        name="t",
        task=task,
        model=ModelSettings(base="base"),
        data=DataSettings(train=train, validation=train, **settings),
    )


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json-array", "parquet"])
def test_load_table_formats(tmp_path: Path, fmt: str) -> None:
    if fmt == "csv":
        path = tmp_path / "t.csv"
        ROWS.to_csv(path, index=False)
    elif fmt == "tsv":
        path = tmp_path / "t.tsv"
        ROWS.to_csv(path, index=False, sep="\t")
    elif fmt == "jsonl":
        path = tmp_path / "t.jsonl"
        ROWS.to_json(path, orient="records", lines=True)
    elif fmt == "json-array":
        path = tmp_path / "t.json"
        path.write_text(json.dumps(ROWS.to_dict(orient="records")))
    else:
        path = tmp_path / "t.parquet"
        ROWS.to_parquet(path)
    df = load_table(path)
    assert list(df["text"]) == ["good film", "NA", "bad plot"]  # "NA" stays text
    assert list(df["label"]) == list(ROWS["label"])


@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv"])
def test_load_imagefolder(tmp_path: Path, metadata: str) -> None:
    meta = pd.DataFrame({"file_name": ["a.png", "sub/b.png"], "caption": ["a cat", "a dog"]})
    if metadata.endswith(".jsonl"):
        meta.to_json(tmp_path / metadata, orient="records", lines=True)
    else:
        meta.to_csv(tmp_path / metadata, index=False)
    df = load_table(tmp_path)
    assert list(df["image"]) == [str(tmp_path / "a.png"), str(tmp_path / "sub/b.png")]


# (file name, bytes, regex of the message)
BAD_FILES = {
    "empty csv": ("t.csv", b"", r"is empty; it needs a header row"),
    "blank csv": ("t.csv", b"\n\n", r"is empty"),
    "header only csv": ("t.csv", b"text,label\n", r"has no data rows"),
    "ragged long": (
        "t.csv",
        b"text,label\na,b\nc,d,e\n",
        r"row 3 has 3 fields but the header has 2",
    ),
    "ragged short": ("t.csv", b"text,label\na,b\nc\n", r"row 3 has 1 fields but the header has 2"),
    "unclosed quote": ("t.csv", b'text,label\n"a,b\n', r"not valid CSV|fields"),
    "duplicate columns": ("t.csv", b"text,text\na,b\n", r"duplicate column names \['text'\]"),
    "empty column name": ("t.csv", b"text,\na,b\n", r"empty column name"),
    "latin-1 csv": (
        "t.csv",
        b"text,label\ncaf\xe9,positive\n",
        r"not UTF-8 text \(byte 0xe9 on line 2\)",
    ),
    "empty jsonl": ("t.jsonl", b"", r"is empty; it needs one JSON object per line"),
    "bad jsonl": ("t.jsonl", b'{"text": "a"}\n{"text": \n', r"line 2 is not valid JSON"),
    "jsonl not objects": ("t.jsonl", b"[1, 2]\n", r"record 1 is int, not an object"),
    "jsonl scalar lines": ("t.jsonl", b"1\n2\n", r"record 1 is int"),
    "bad json array": ("t.json", b"[{", r"is not valid JSON"),
    "empty parquet": ("t.parquet", b"", r"is empty; write a Parquet file"),
    "corrupt parquet": ("t.parquet", b"PAR1 not really parquet", r"is not a readable Parquet file"),
    "unknown suffix": ("t.xlsx", b"x", r"unknown format '.xlsx'"),
    "no suffix": ("data", b"x", r"unknown format '\(no suffix\)'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_one_line_message(tmp_path: Path, case: str) -> None:
    name, content, pattern = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=pattern) as info:
        load_table(path, what="train file")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("train file")
    assert path.read_bytes() == content  # never touched


def test_missing_path_and_imagefolder_problems(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data file not found: .*nothing.csv; check the path"):
        load_table(tmp_path / "nothing.csv")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DataError, match="without metadata.jsonl or metadata.csv"):
        load_table(tmp_path / "imgs")
    (tmp_path / "imgs" / "metadata.csv").write_text("name,caption\na.png,x\n")
    with pytest.raises(DataError, match="has no file_name column"):
        load_table(tmp_path / "imgs")


def write_csv(tmp_path: Path, df: pd.DataFrame, name: str = "train.csv") -> str:
    df.to_csv(tmp_path / name, index=False)
    return name


def test_load_split_and_label_ids(tmp_path: Path) -> None:
    project = make_project(tmp_path, write_csv(tmp_path, ROWS))
    df = load_split(project, "train")
    assert label_ids(project, df).tolist() == [1, 0, 0]
    assert label_ids(project, df).dtype == torch.long


def test_integer_labels_match_string_label_list(tmp_path: Path) -> None:
    df = pd.DataFrame({"text": ["a", "b"], "label": [0, 1]})
    project = make_project(tmp_path, write_csv(tmp_path, df), labels=["0", "1"])
    assert label_ids(project, load_split(project, "train")).tolist() == [0, 1]


@pytest.mark.parametrize(
    ("df", "settings", "pattern"),
    [
        (
            ROWS.rename(columns={"text": "sentence"}),
            {},
            r"has no column 'text' \(text_column in project.toml\); its columns are: sentence, label; fix text_column",
        ),
        (
            ROWS.assign(label=["positive", "neutral", "negative"]),
            {},
            r"row 1 has label 'neutral', which is not in labels \['negative', 'positive'\]",
        ),
        (
            ROWS.assign(text=["a", "", "c"]),
            {},
            r"column 'text' is empty in 1 row\(s\), first at row 1",
        ),
        (ROWS.assign(id=[1, 2, 1]), {}, r"id 1 appears more than once"),
        (ROWS, {"category_column": "topic"}, r"has no column 'topic' \(category_column"),
    ],
    ids=["missing column", "unknown label", "empty text", "duplicate id", "missing category"],
)
def test_load_split_validation(
    tmp_path: Path, df: pd.DataFrame, settings: dict, pattern: str
) -> None:
    project = make_project(tmp_path, write_csv(tmp_path, df), **settings)
    digest = hashlib.sha256((tmp_path / "train.csv").read_bytes()).hexdigest()
    with pytest.raises(DataError, match=pattern) as info:
        load_split(project, "train")
    assert "\n" not in str(info.value)
    assert hashlib.sha256((tmp_path / "train.csv").read_bytes()).hexdigest() == digest


def test_text_to_image_checks_images(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"fake")
    meta = pd.DataFrame({"file_name": ["a.png", "b.png"], "caption": ["x", "y"]})
    meta.to_json(tmp_path / "metadata.jsonl", orient="records", lines=True)
    project = make_project(tmp_path, ".", task="text-to-image")
    with pytest.raises(DataError, match=r"row 1 names image .*b.png.*which does not exist"):
        load_split(project, "train")
    (tmp_path / "b.png").write_bytes(b"fake")
    assert len(load_split(project, "train")) == 2


def test_build_examples_classification(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(save_tiny_bert(tmp_path / "bert"))
    project = make_project(tmp_path, write_csv(tmp_path, ROWS), max_length=4)
    examples = build_examples(project, load_split(project, "train"), tokenizer)
    assert len(examples) == 3
    assert examples[0]["labels"].shape == () and int(examples[0]["labels"]) == 1
    assert examples[0]["input_ids"].dtype == torch.long
    assert all(len(ex["input_ids"]) <= 4 for ex in examples)
    assert examples[0]["input_ids"][0] == tokenizer.cls_token_id


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(save_tiny_llama(tmp_path_factory.mktemp("llama")))


@pytest.mark.parametrize("loss_tokens", ["response", "prompt", "all"])
def test_build_examples_generation_loss_tokens(
    tmp_path: Path, llama_tokenizer, loss_tokens: str
) -> None:
    df = pd.DataFrame({"prompt": ["what do cats like ?"], "response": ["cats like to run"]})
    project = make_project(tmp_path, write_csv(tmp_path, df), task="generation")
    (example,) = build_examples(
        project, load_split(project, "train"), llama_tokenizer, loss_tokens=loss_tokens
    )
    ids, labels = example["input_ids"], example["labels"]
    tokens = llama_tokenizer.convert_ids_to_tokens(ids.tolist())
    assert tokens == ["<s>", "what", "do", "cats", "like", "?", "cats", "like", "to", "run", "</s>"]
    n_prompt = 6
    if loss_tokens == "response":
        assert (labels[:n_prompt] == -100).all() and (labels[n_prompt:] == ids[n_prompt:]).all()
    elif loss_tokens == "prompt":
        assert (labels[:n_prompt] == ids[:n_prompt]).all() and (labels[n_prompt:] == -100).all()
    else:
        assert (labels == ids).all()


def test_generation_truncation_keeps_response(tmp_path: Path, llama_tokenizer) -> None:
    df = pd.DataFrame({"prompt": ["what do cats like " * 5], "response": ["cats like to run"]})
    project = make_project(tmp_path, write_csv(tmp_path, df), task="generation", max_length=10)
    (example,) = build_examples(project, load_split(project, "train"), llama_tokenizer)
    assert len(example["input_ids"]) == 10
    # The response (4 words + EOS) fits in half of max_length, so it survives whole; the prompt
    # keeps its last tokens.
    assert (example["labels"] != -100).sum() == 5
    project.data.max_length = 2
    with pytest.raises(DataError, match=r"row 0: no prompt tokens left for the loss"):
        build_examples(project, load_split(project, "train"), llama_tokenizer, loss_tokens="prompt")


def test_build_examples_rejects_text_to_image(tmp_path: Path) -> None:
    project = make_project(tmp_path, "x", task="text-to-image")
    with pytest.raises(ValueError, match="diffusion.build_image_examples"):
        build_examples(project, pd.DataFrame(), None)
