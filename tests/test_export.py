"""Export: review columns joined onto the train table, csv/jsonl/parquet round trips, safety."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from datainf_core.errors import DataInfError
from datainf_core.export import (
    REVIEW_COLUMNS,
    ExportError,
    build_export_frame,
    check_not_source,
    export_dataset,
    export_log,
    infer_format,
    summarize_changes,
    write_table,
)
from datainf_core.review import ReviewStore


def _read(path, fmt):
    if fmt == "csv":
        return pd.read_csv(path)
    if fmt == "jsonl":
        return pd.read_json(path, lines=True)
    return pd.read_parquet(path)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def project(tmp_path):
    from datainf_core.project import create_project

    rng = np.random.default_rng(0)
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    train = pd.DataFrame(
        {
            "id": np.arange(12),
            "text": [" ".join(rng.choice(words, size=4)) + " é" for _ in range(12)],
            "label": ["pos", "neg"] * 6,
        }
    )
    train.to_csv(tmp_path / "train.csv", index=False)
    train.iloc[:4].to_csv(tmp_path / "validation.csv", index=False)
    return create_project(
        tmp_path / "proj",
        task="classification",
        base="tiny/unused-model",
        train=tmp_path / "train.csv",
        validation=tmp_path / "validation.csv",
    )


def test_build_frame_joins_decisions_and_scores():
    train = pd.DataFrame({"text": list("abcde"), "label": [0, 1, 0, 1, 0]})
    decisions = pd.DataFrame(
        {
            "train_index": [1, 3, 4, 99],
            "action": ["relabel", "exclude", "keep", "keep"],
            "corrected_label": ["0", None, None, None],
            "note": ["", "", "", ""],
            "reviewed_at": ["t1", "t2", "t3", "t4"],
        }
    )
    scores = pd.Series([0.5, -1.0, 2.0, 0.0, 1.5], index=range(5))
    frame = build_export_frame(train, decisions, label_column="label", scores=scores)
    assert list(frame.columns) == ["text", "label", *REVIEW_COLUMNS]
    assert frame["label"].tolist() == [0, 1, 0, 1, 0]  # unchanged without apply_relabels
    assert frame["original_label"].tolist() == [0, 1, 0, 1, 0]
    assert frame["action"].tolist() == [None, "relabel", None, "exclude", "keep"]
    assert frame["corrected_label"].tolist() == [None, "0", None, None, None]
    np.testing.assert_array_equal(frame["score"].to_numpy(), scores.to_numpy())

    cleaned = build_export_frame(
        train,
        decisions,
        label_column="label",
        scores=scores,
        drop_excluded=True,
        apply_relabels=True,
    )
    assert cleaned["text"].tolist() == ["a", "b", "c", "e"]
    assert cleaned["label"].tolist() == [0, 0, 0, 0]
    assert cleaned["label"].dtype == train["label"].dtype
    assert cleaned["original_label"].tolist() == [0, 1, 0, 0]
    summary = summarize_changes(cleaned, total=len(train))
    assert summary["dropped"] == 1
    assert summary["exported_rows"] == 4
    assert summary["relabel"] == 1


def test_build_frame_without_decisions_or_labels():
    train = pd.DataFrame({"prompt": ["p1", "p2"], "response": ["r1", "r2"]})
    empty = pd.DataFrame(
        columns=["train_index", "action", "corrected_label", "note", "reviewed_at"]
    )
    frame = build_export_frame(train, empty)
    assert frame["original_label"].isna().all()
    assert frame["action"].isna().all()
    assert frame["score"].isna().all()


def test_column_clash_is_refused():
    train = pd.DataFrame({"text": ["a"], "action": ["x"]})
    empty = pd.DataFrame(
        columns=["train_index", "action", "corrected_label", "note", "reviewed_at"]
    )
    with pytest.raises(ExportError, match="already has a column named 'action'"):
        build_export_frame(train, empty)


@pytest.mark.parametrize(
    ("path", "fmt", "expected"),
    [
        ("a.csv", None, "csv"),
        ("a.JSONL", None, "jsonl"),
        ("a.parquet", None, "parquet"),
        ("a.txt", "csv", "csv"),
    ],
)
def test_infer_format(path, fmt, expected):
    assert infer_format(path, fmt) == expected


@pytest.mark.parametrize(("path", "fmt"), [("a.txt", None), ("a.csv", "xlsx")])
def test_infer_format_errors(path, fmt):
    with pytest.raises(ExportError) as info:
        infer_format(path, fmt)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_export_round_trip(project, tmp_path, fmt):
    store = ReviewStore(project.reviews_path)
    store.record(2, "relabel", corrected_label="neg")
    store.record([5, 7], "exclude")
    store.record(0, "keep")
    source_digests = {p: _digest(p) for p in (project.train_path, project.validation_path)}

    out = export_dataset(project, tmp_path / f"out.{fmt}", fmt=fmt)
    back = _read(out, fmt)
    assert len(back) == 12
    assert list(back.columns) == ["id", "text", "label", *REVIEW_COLUMNS]
    assert back.loc[2, "corrected_label"] == "neg"
    assert back.loc[2, "label"] == "pos"  # labels untouched unless apply_relabels
    assert back.loc[5, "action"] == "exclude"
    assert back["text"].tolist() == pd.read_csv(project.train_path)["text"].tolist()
    assert back["reviewed_at"].notna().sum() == 4

    cleaned = export_dataset(
        project, tmp_path / f"clean.{fmt}", drop_excluded=True, apply_relabels=True
    )
    back = _read(cleaned, fmt)
    assert back["id"].tolist() == [0, 1, 2, 3, 4, 6, 8, 9, 10, 11]
    assert back.loc[2, "label"] == "neg"
    assert back.loc[2, "original_label"] == "pos"
    # The cleaned file is itself a valid train file for the project.
    from datainf_core.data import load_table

    assert len(load_table(cleaned)) == 10
    assert {p: _digest(p) for p in source_digests} == source_digests


def test_export_refuses_source_files(project, tmp_path):
    before = _digest(project.train_path)
    for target in (
        project.train_path,
        project.validation_path,
        project.reviews_path,
        project.root / "project.toml",
    ):
        with pytest.raises(ExportError, match="refusing to write the export over") as info:
            export_dataset(project, target, fmt="csv")
        assert isinstance(info.value, DataInfError)
    # A different spelling of the same file (.. in the path) is caught too.
    sneaky = project.root / ".." / "proj" / ".." / "train.csv"
    with pytest.raises(ExportError):
        export_dataset(project, sneaky)
    assert _digest(project.train_path) == before


def test_export_refuses_inside_imagefolder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    fake = type("P", (), {"train_path": folder, "validation_path": tmp_path / "v.csv"})()
    with pytest.raises(ExportError):
        check_not_source(fake, folder / "metadata.jsonl")
    check_not_source(fake, tmp_path / "elsewhere.csv")


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "keep.csv"
    target.write_text("old\n")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("datainf_core.export.os.replace", fail)
    with pytest.raises(ExportError, match="No space left") as info:
        write_table(pd.DataFrame({"a": [1]}), target)
    assert "\n" not in str(info.value)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.csv"]  # no temporary file left


def test_write_to_folder_refused(tmp_path):
    (tmp_path / "x.csv").mkdir()
    with pytest.raises(ExportError, match="is a folder"):
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "x.csv")


def test_export_log(project, tmp_path):
    store = ReviewStore(project.reviews_path)
    store.record(1, "exclude")
    store.undo()
    out = export_log(project, tmp_path / "log.jsonl")
    back = pd.read_json(out, lines=True)
    assert back["kind"].tolist() == ["decide", "undo"]


def test_export_refuses_local_base_model_folder(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    fake = type(
        "P",
        (),
        {"train_path": tmp_path / "t.csv", "base_is_local": True, "base_location": str(base)},
    )()
    with pytest.raises(ExportError, match="refusing to write"):
        check_not_source(fake, base / "config.json")
