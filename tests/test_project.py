"""project.toml: creation, round trip, and one clear message per bad field."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from datainf_core.errors import ProjectError
from datainf_core.project import (
    PROJECT_FILE,
    Project,
    create_project,
    dumps_toml,
    load_project,
    write_atomic,
)

GOOD = """name = "demo"
task = "classification"

[model]
base = "base"
adapter = "adapter"

[data]
train = "train.csv"
validation = "validation.csv"
text_column = "text"
label_column = "label"
labels = ["negative", "positive"]
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A project folder with data files, an empty base folder and an adapter folder."""
    df = pd.DataFrame(
        {"text": ["good film", "bad film", "fine"], "label": ["positive", "negative", "positive"]}
    )
    df.to_csv(tmp_path / "train.csv", index=False)
    df.to_csv(tmp_path / "validation.csv", index=False)
    (tmp_path / "base").mkdir()
    (tmp_path / "adapter").mkdir()
    return tmp_path


def write(folder: Path, text: str) -> None:
    (folder / PROJECT_FILE).write_text(text, encoding="utf-8")


def test_load_good_project(folder: Path) -> None:
    write(folder, GOOD)
    project = load_project(folder)
    assert project.task == "classification"
    assert project.train_path == folder.resolve() / "train.csv"
    assert project.adapter_path == folder.resolve() / "adapter"
    assert project.base_location == str(folder.resolve() / "base")
    assert project.data.labels == ["negative", "positive"]
    assert project.data.max_length == 128
    assert project.influence.batch_size == 16
    assert project.runs_dir == folder.resolve() / "runs"
    assert project.reviews_path.name == "reviews.sqlite"
    assert project.gradients_dir.name == "gradients"


def test_save_round_trip_is_valid_toml(folder: Path) -> None:
    write(folder, GOOD)
    project = load_project(folder)
    project.name = 'with "quotes" and ünïcode'
    project.influence.include = ["*lora_A*", "classifier"]
    project.save()
    again = load_project(folder)
    assert again.to_dict() == project.to_dict()
    assert tomllib.loads((folder / PROJECT_FILE).read_text())["name"] == project.name
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_write_atomic_keeps_old_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "x.json"
    write_atomic(path, "old")
    assert stat.S_IMODE(path.stat().st_mode) & 0o044  # readable by others, not mkstemp's 0600

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_dumps_toml_orders_tables() -> None:
    text = dumps_toml({"a": 1, "t": {"x": True, "y": [1, 2], "z": None}, "b": "s"})
    assert text.index("b = ") < text.index("[t]")
    assert tomllib.loads(text) == {"a": 1, "b": "s", "t": {"x": True, "y": [1, 2]}}


# Each bad field: (edit of GOOD, a regex its message must match). Every message is its own.
BAD_CASES = {
    "unknown top key": (
        GOOD.replace('task = "classification"', 'task = "classification"\ncolour = 1'),
        r"unknown key 'colour' at the top level",
    ),
    "unknown table": (GOOD + "\n[extras]\nx = 1\n", r"unknown table \[extras\]"),
    "unknown data key": (
        GOOD.replace('label_column = "label"', 'label_column = "label"\ntxt = "a"'),
        r"unknown key 'txt' in \[data\]",
    ),
    "unknown model key": (
        GOOD.replace('adapter = "adapter"', 'adapter = "adapter"\nlora = 1'),
        r"unknown key 'lora' in \[model\]",
    ),
    "name wrong type": (
        GOOD.replace('name = "demo"', "name = 3"),
        r"name should be a string, got 3",
    ),
    "max_length wrong type": (
        GOOD + 'max_length = "long"\n',
        r"\[data\] max_length should be an integer, got 'long'",
    ),
    "labels wrong type": (
        GOOD.replace('labels = ["negative", "positive"]', 'labels = "negative,positive"'),
        r"\[data\] labels should be a list of strings",
    ),
    "labels not strings": (
        GOOD.replace('labels = ["negative", "positive"]', "labels = [true, false]"),
        r"\[data\] labels should be a list of strings.*, got \[True, False\]",
    ),
    "bool wrong type": (
        GOOD.replace('adapter = "adapter"', 'adapter = "adapter"\ntrust_remote_code = "yes"'),
        r"trust_remote_code should be true or false",
    ),
    "model not a table": (
        GOOD.replace("[model]\n", "model = 1\n[nothing]\n", 1),
        r"unknown (key|table)",
    ),
    "missing name": (GOOD.replace('name = "demo"\n', ""), r"missing name"),
    "missing task": (GOOD.replace('task = "classification"\n', ""), r"missing task"),
    "missing base": (GOOD.replace('base = "base"\n', ""), r"\[model\] base is missing"),
    "missing train": (GOOD.replace('train = "train.csv"\n', ""), r"\[data\] train is missing"),
    "unknown task": (
        GOOD.replace('task = "classification"', 'task = "regression"'),
        r"unknown task 'regression'; use one of classification, generation, text-to-image",
    ),
    "empty name": (GOOD.replace('name = "demo"', 'name = " "'), r"name is empty"),
    "bad dtype": (
        GOOD.replace('adapter = "adapter"', 'adapter = "adapter"\ndtype = "int8"'),
        r"dtype 'int8' is not supported",
    ),
    "bad loss tokens": (
        GOOD + '\n[influence]\nloss_tokens = "middle"\n',
        r"loss_tokens 'middle' is not valid",
    ),
    "bad diffusion noise": (
        GOOD + '\n[influence]\ndiffusion_noise = "fresh"\n',
        r"diffusion_noise 'fresh' is not valid; use one of shared, per_sample",
    ),
    "batch size zero": (
        GOOD + "\n[influence]\nbatch_size = 0\n",
        r"batch_size must be at least 1, got 0",
    ),
    "max_length one": (GOOD + "max_length = 1\n", r"max_length must be at least 2, got 1"),
    "missing text column": (
        GOOD.replace('text_column = "text"\n', ""),
        r"\[data\] text_column is required for task 'classification'",
    ),
    "missing labels": (
        GOOD.replace('labels = ["negative", "positive"]\n', ""),
        r"\[data\] labels is required for classification",
    ),
    "one label": (
        GOOD.replace('labels = ["negative", "positive"]', 'labels = ["only"]'),
        r"labels needs at least 2 classes",
    ),
    "duplicate label": (
        GOOD.replace('labels = ["negative", "positive"]', 'labels = ["a", "b", "a"]'),
        r"labels lists 'a' twice",
    ),
    "train file missing": (
        GOOD.replace('train = "train.csv"', 'train = "nope.csv"'),
        r"\[data\] train file not found: .*nope.csv",
    ),
    "validation file missing": (
        GOOD.replace('validation = "validation.csv"', 'validation = "v.csv"'),
        r"\[data\] validation file not found",
    ),
    "adapter missing": (
        GOOD.replace('adapter = "adapter"', 'adapter = "gone"'),
        r"\[model\] adapter folder not found: .*gone",
    ),
    "base missing": (
        GOOD.replace('base = "base"', 'base = "./no-model"'),
        r"\[model\] base model not found",
    ),
    "generation needs prompt": (
        GOOD.replace('task = "classification"', 'task = "generation"'),
        r"\[data\] prompt_column is required for task 'generation'",
    ),
    "image needs image column": (
        GOOD.replace('task = "classification"', 'task = "text-to-image"'),
        r"\[data\] image_column is required for task 'text-to-image'",
    ),
    "invalid toml": (GOOD.replace('name = "demo"', "name = demo"), r"is not valid TOML: .*line 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_field_has_its_own_one_line_message(folder: Path, case: str) -> None:
    text, pattern = BAD_CASES[case]
    write(folder, text)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(ProjectError, match=pattern) as info:
        load_project(folder)
    message = str(info.value)
    assert "\n" not in message
    assert ";" in message  # every message ends with the fix
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_messages_are_distinct(folder: Path) -> None:
    messages = set()
    for text, _ in BAD_CASES.values():
        write(folder, text)
        with pytest.raises(ProjectError) as info:
            load_project(folder)
        messages.add(str(info.value))
    assert len(messages) == len(BAD_CASES)


def test_missing_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match="project folder not found"):
        load_project(tmp_path / "none")
    with pytest.raises(ProjectError, match=r"no project.toml in .*datainf new"):
        load_project(tmp_path)


def test_non_utf8_project_file(folder: Path) -> None:
    (folder / PROJECT_FILE).write_bytes(b'name = "d\xe9mo"\n')
    with pytest.raises(ProjectError, match="not UTF-8"):
        load_project(folder)


def test_create_project_infers_labels_and_defaults(folder: Path, monkeypatch) -> None:
    monkeypatch.chdir(folder)
    project = create_project(
        folder / "p", task="classification", base="./base", adapter=None, train="train.csv",
        validation=str(folder / "validation.csv"),
    )  # fmt: skip
    assert isinstance(project, Project)
    assert project.data.labels == ["negative", "positive"]
    assert project.data.text_column == "text" and project.data.label_column == "label"
    # Paths given relative to the current directory are stored relative to the project.
    saved = tomllib.loads((folder / "p" / PROJECT_FILE).read_text())
    assert saved["data"]["train"] == str(folder.resolve() / "train.csv")
    assert load_project(folder / "p").train_path == folder.resolve() / "train.csv"
    assert project.name == "p"


def test_create_project_inside_folder_keeps_relative_paths(folder: Path) -> None:
    project = create_project(
        folder, task="classification", base="base", adapter=None, train="train.csv",
        validation="validation.csv", labels=["negative", "positive"], max_length=64,
    )  # fmt: skip
    saved = tomllib.loads(project.project_file.read_text())
    assert saved["data"]["train"] == "train.csv"
    assert "adapter" not in saved["model"]
    assert saved["data"]["max_length"] == 64
    with pytest.raises(ProjectError, match="already has a project.toml"):
        create_project(
            folder,
            task="classification",
            base="base",
            train="train.csv",
            validation="validation.csv",
        )


def test_create_project_rejects_unknown_setting_and_task(folder: Path) -> None:
    with pytest.raises(ProjectError, match="unknown project setting 'colour'"):
        create_project(
            folder,
            task="classification",
            base="base",
            train="train.csv",
            validation="validation.csv",
            colour="red",
        )
    with pytest.raises(ProjectError, match="unknown task 'ranking'"):
        create_project(
            folder, task="ranking", base="base", train="train.csv", validation="validation.csv"
        )
    assert not (folder / PROJECT_FILE).exists()


def test_integer_labels_become_strings(folder: Path) -> None:
    write(folder, GOOD.replace('labels = ["negative", "positive"]', "labels = [0, 1]"))
    assert load_project(folder).data.labels == ["0", "1"]


def test_hub_id_base_is_not_a_path(folder: Path) -> None:
    write(folder, GOOD.replace('base = "base"', 'base = "org/some-model"'))
    project = load_project(folder)
    assert project.base_location == "org/some-model"
    assert not project.base_is_local
