"""Bad-input corpus: every case costs the user one sentence, never a traceback or a changed file.

Each case builds a small broken input (a data file, an adapter folder, a ``project.toml``, or a
simulated failure) in ``tmp_path`` and checks, where it applies:

1. the CLI (``datainf_core.cli.main``) exits != 0 and writes exactly ONE line to stderr, which names
   the problem (``expect``) and a fix, with no traceback;
2. the same input in the app (AppTest: open the project, or fill in the create form) shows
   ``st.error``, raises no exception, and the app still runs afterwards;
3. every file that existed before (the user's sources, the shared base model) is byte-identical
   afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fixtures import (
    make_tiny_classification_project,
    save_lora_adapter,
    save_tiny_bert,
)

from datainf_core import cli
from datainf_core.project import dumps_toml

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TIMEOUT = 90
# A message names a fix: one of these verbs appears in it.
FIX_WORDS = re.compile(
    r"\b(fix|use|add|set|re-save|re-export|save|check|give|pick|point|convert|remove|create|"
    r"rename|retrain|free|pass|quote|name|write|list|fill|delete|write|start|run|choose|drop|"
    r"recollect|lower|raise|see|needs?|allowed|expected|one of|should be|must be)\b|e\.g\.",
    re.IGNORECASE,
)


# ---- shared assets ------------------------------------------------------------------------------


@dataclass
class Assets:
    """The shared tiny model folders (read-only for every case)."""

    root: Path
    base: Path
    adapter: Path
    other_adapter: Path
    train: pd.DataFrame
    validation: pd.DataFrame


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    project = make_tiny_classification_project(
        tmp_path_factory.mktemp("assets"), n_train=8, n_validation=4, noise=0.0
    )
    root = project.root
    # An adapter trained on another (differently shaped) base model.
    other_base = save_tiny_bert(root.parent / "other_bert", num_labels=3, seed=1)
    other_adapter = save_lora_adapter(
        other_base, root.parent / "other_adapter", num_labels=3, seed=1
    )
    return Assets(
        root=root.parent,
        base=Path(project.base_location),
        adapter=Path(project.adapter_path),
        other_adapter=other_adapter,
        train=pd.read_csv(project.train_path),
        validation=pd.read_csv(project.validation_path),
    )


def _project_toml(
    folder: Path, assets: Assets, *, train: str = "train.csv", **tables: dict[str, Any]
) -> Path:
    """Writes a classification ``project.toml`` into ``folder``; ``tables`` update its tables."""
    content: dict[str, Any] = {
        "name": "bad input",
        "task": "classification",
        "model": {"base": str(assets.base), "adapter": str(assets.adapter)},
        "data": {
            "train": train,
            "validation": "validation.csv",
            "text_column": "text",
            "label_column": "label",
            "labels": ["negative", "positive"],
            "max_length": 32,
        },
        "influence": {"batch_size": 8},
    }
    for table, values in tables.items():
        content[table] = {**content.get(table, {}), **values}
        content[table] = {k: v for k, v in content[table].items() if v is not None}
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "validation.csv").exists():
        assets.validation.to_csv(folder / "validation.csv", index=False)
    path = folder / "project.toml"
    path.write_text(dumps_toml(content), encoding="utf-8")
    return path


@dataclass
class Setup:
    """What a case hands to the three checks."""

    argv: list[str]
    expect: str  # a substring of the one-line message (case-insensitive): the problem named
    app: dict[str, Any] | None = None  # {"open": folder} or {"create": {field key: value}}
    monkeypatch: Callable[[pytest.MonkeyPatch], None] | None = None
    after: Callable[[], None] | None = None  # extra checks once the CLI has failed
    extra_env: dict[str, str] = field(default_factory=dict)


# ---- builders -------------------------------------------------------------------------------------


def _good_train(assets: Assets) -> pd.DataFrame:
    return assets.train.copy()


def _info_case(folder: Path, assets: Assets, expect: str, **tables: Any) -> Setup:
    _project_toml(folder, assets, **tables)
    return Setup(["info", str(folder)], expect, app={"open": folder})


def _data_case(write: Callable[[Path], None], name: str, expect: str) -> Callable[..., Setup]:
    """A project whose train file ``name`` is written by ``write``; checked by ``info``/open."""

    def build(folder: Path, assets: Assets) -> Setup:
        folder.mkdir(parents=True, exist_ok=True)
        write(folder / name)
        return _info_case(folder, assets, expect, data={"train": name})

    return build


def _csv_text(text: str | bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")

    return write


def _frame(change: Callable[[pd.DataFrame], pd.DataFrame], fmt: str = "csv") -> Callable[..., Any]:
    def write(path: Path, assets: Assets) -> None:
        df = change(_good_train(assets))
        if fmt == "csv":
            df.to_csv(path, index=False)
        elif fmt == "jsonl":
            df.to_json(path, orient="records", lines=True)
        else:
            df.to_parquet(path, index=False)

    return write


def _frame_case(
    change: Callable[[pd.DataFrame], pd.DataFrame], expect: str, fmt: str = "csv", **data: Any
) -> Callable[..., Setup]:
    def build(folder: Path, assets: Assets) -> Setup:
        folder.mkdir(parents=True, exist_ok=True)
        name = f"train.{fmt}"
        _frame(change, fmt)(folder / name, assets)
        return _info_case(folder, assets, expect, data={"train": name, **data})

    return build


def _toml_case(text: str, expect: str) -> Callable[..., Setup]:
    """A project folder whose project.toml is ``text`` ({base}/{adapter} filled in)."""

    def build(folder: Path, assets: Assets) -> Setup:
        _project_toml(folder, assets)
        _good_train(assets).to_csv(folder / "train.csv", index=False)
        raw = text.replace("{base}", json.dumps(str(assets.base))).replace(
            "{adapter}", json.dumps(str(assets.adapter))
        )
        (folder / "project.toml").write_text(raw, encoding="utf-8")
        return Setup(["info", str(folder)], expect, app={"open": folder})

    return build


GOOD_TOML = """name = "bad input"
task = "classification"

[model]
base = {base}
adapter = {adapter}

[data]
train = "train.csv"
validation = "validation.csv"
labels = ["negative", "positive"]
text_column = "text"
label_column = "label"
"""


def _new_case(expect: str, *, adapter: str = "adapter", **files: Any) -> Callable[..., Setup]:
    """``datainf new`` (and the create form) with the good train file unless ``files`` say."""

    def build(folder: Path, assets: Assets) -> Setup:
        src = folder / "src"
        src.mkdir(parents=True)
        _good_train(assets).to_csv(src / "train.csv", index=False)
        assets.validation.to_csv(src / "validation.csv", index=False)
        train = str(src / "train.csv")
        adapter_path = {"adapter": assets.adapter, "other": assets.other_adapter}.get(adapter)
        if "make_train" in files:
            train = str(files["make_train"](src))
        if "make_adapter" in files:
            adapter_path = files["make_adapter"](src, assets)
        proj = folder / "proj"
        argv = ["new", str(proj), "--task", files.get("task", "classification")]
        argv += ["--base", str(assets.base), "--train", train]
        argv += ["--validation", str(src / "validation.csv")]
        if adapter_path is not None:
            argv += ["--adapter", str(adapter_path)]
        form = {
            "create_root": str(proj),
            "create_base": str(assets.base),
            "create_adapter": str(adapter_path or ""),
            "create_train": train,
            "create_val": str(src / "validation.csv"),
        }
        return Setup(argv, expect, app={"create": form, "task": files.get("task")})

    return build


def _missing_dir(src: Path) -> Path:
    return src / "no_such_file.csv"


def _folder_train(src: Path) -> Path:
    (src / "images").mkdir()
    return src / "images"


def _xlsx_train(src: Path) -> Path:
    (src / "train.xlsx").write_bytes(b"PK\x03\x04 not really a workbook")
    return src / "train.xlsx"


def _adapter_copy(src: Path, assets: Assets) -> Path:
    target = src / "adapter"
    shutil.copytree(assets.adapter, target)
    return target


def _adapter_no_lora(src: Path, assets: Assets) -> Path:
    from safetensors.torch import load_file, save_file

    target = _adapter_copy(src, assets)
    weights = load_file(target / "adapter_model.safetensors")
    renamed = {k.replace("lora_", "plain_"): v for k, v in weights.items()}
    save_file(renamed, target / "adapter_model.safetensors")
    return target


def _adapter_no_config(src: Path, assets: Assets) -> Path:
    target = _adapter_copy(src, assets)
    (target / "adapter_config.json").unlink()
    return target


def _adapter_bad_json(src: Path, assets: Assets) -> Path:
    target = _adapter_copy(src, assets)
    (target / "adapter_config.json").write_text('{"peft_type": "LORA", ', encoding="utf-8")
    return target


def _adapter_no_weights(src: Path, assets: Assets) -> Path:
    target = _adapter_copy(src, assets)
    (target / "adapter_model.safetensors").unlink()
    return target


def _adapter_truncated(src: Path, assets: Assets) -> Path:
    target = _adapter_copy(src, assets)
    path = target / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return target


def _adapter_wrong_task(src: Path, assets: Assets) -> Path:
    target = _adapter_copy(src, assets)
    config = json.loads((target / "adapter_config.json").read_text())
    config["task_type"] = "CAUSAL_LM"
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def _adapter_pickle_only(src: Path, assets: Assets) -> Path:
    import torch
    from safetensors.torch import load_file

    target = _adapter_copy(src, assets)
    weights = load_file(target / "adapter_model.safetensors")
    torch.save(weights, target / "adapter_model.bin")
    (target / "adapter_model.safetensors").unlink()
    return target


# ---- run-time cases (CLI `run` / `export` on a good project) ---------------------------------------


def _run_project(folder: Path, assets: Assets, **tables: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _good_train(assets).to_csv(folder / "train.csv", index=False)
    _project_toml(folder, assets, **tables)
    return folder


def _nan_losses(folder: Path, assets: Assets) -> Setup:
    """float16 model with a blown-up adapter: activations overflow to inf, the loss is NaN."""
    from safetensors.torch import load_file, save_file

    adapter = folder / "adapter"
    shutil.copytree(assets.adapter, adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    weights = {k: (v * 1e8 if "lora_B" in k else v) for k, v in weights.items()}
    save_file(weights, adapter / "adapter_model.safetensors")
    _run_project(folder, assets, model={"dtype": "float16", "adapter": "adapter"})
    return Setup(["run", str(folder), "--no-progress"], "nan or inf")


def _disk_full(folder: Path, assets: Assets) -> Setup:
    """The gradient store's shard write fails half-way with ENOSPC."""
    _run_project(folder, assets)

    def half_write(tensors: dict[str, Any], filename: str, *args: Any, **kwargs: Any) -> None:
        Path(filename).write_bytes(b"\x00" * 64)  # a partial shard, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("datainf_core.store.save_file", half_write)

    def after() -> None:
        leftovers = [p for p in (folder / "gradients").rglob("*") if p.suffix == ".tmp"]
        assert not leftovers, f"half-written files left behind: {leftovers}"
        shards = list((folder / "gradients").rglob("shard-*.safetensors"))
        assert not shards, f"a shard was recorded although its write failed: {shards}"

    return Setup(["run", str(folder), "--no-progress"], "space", monkeypatch=patch, after=after)


def _unknown_method(folder: Path, assets: Assets) -> Setup:
    _run_project(folder, assets)
    return Setup(["run", str(folder), "--method", "magic", "--no-progress"], "magic")


def _bad_device(folder: Path, assets: Assets) -> Setup:
    _run_project(folder, assets)
    return Setup(["run", str(folder), "--device", "tpu9", "--no-progress"], "tpu9")


def _negative_damping(folder: Path, assets: Assets) -> Setup:
    _run_project(folder, assets)
    return Setup(["run", str(folder), "--damping", "-1", "--no-progress"], "damping")


def _export_over_source(folder: Path, assets: Assets) -> Setup:
    _run_project(folder, assets)
    return Setup(["export", str(folder), "--out", str(folder / "train.csv")], "refusing")


def _export_over_toml(folder: Path, assets: Assets) -> Setup:
    _run_project(folder, assets)
    argv = ["export", str(folder), "--out", str(folder / "project.toml"), "--format", "csv"]
    return Setup(argv, "refusing")


def _task_model_mismatch(folder: Path, assets: Assets) -> Setup:
    """A generation project on a BERT classifier (the adapter claims CAUSAL_LM for it)."""
    adapter = folder / "adapter"
    folder.mkdir(parents=True)
    _adapter_wrong_task(folder, assets)
    pd.DataFrame(
        {"prompt": ["what do cats like"] * 4, "response": ["cats like to run"] * 4}
    ).to_json(folder / "train.jsonl", orient="records", lines=True)
    shutil.copy(folder / "train.jsonl", folder / "validation.jsonl")
    content = {
        "name": "mismatch",
        "task": "generation",
        "model": {"base": str(assets.base), "adapter": str(adapter)},
        "data": {
            "train": "train.jsonl",
            "validation": "validation.jsonl",
            "max_length": 16,
            "prompt_column": "prompt",
            "response_column": "response",
        },  # fmt: skip
    }
    (folder / "project.toml").write_text(dumps_toml(content), encoding="utf-8")
    return Setup(["run", str(folder), "--no-progress"], "causal language model")


def _pickle_base(folder: Path, assets: Assets) -> Setup:
    import torch
    from safetensors.torch import load_file

    base = folder / "base"
    shutil.copytree(assets.base, base)
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    _run_project(folder, assets, model={"base": "base"})
    return Setup(["run", str(folder), "--no-progress"], "pickle")


def _run_unknown_id(folder: Path, assets: Assets) -> Setup:
    _run_project(folder, assets)
    argv = ["export", str(folder), "--out", str(folder / "out.csv"), "--run-id", "nope"]
    return Setup(argv, "nope")


# ---- image (text-to-image) cases: checked by load_split / build_image_examples ----------------------


def _image_project(folder: Path, assets: Assets, metadata: str | None, images: dict) -> Setup:
    train = folder / "train"
    train.mkdir(parents=True)
    for name, payload in images.items():
        (train / name).write_bytes(payload)
    if metadata is not None:
        (train / "metadata.jsonl").write_text(metadata, encoding="utf-8")
    content = {
        "name": "images",
        "task": "text-to-image",
        "model": {"base": str(assets.base)},
        "data": {"train": "train", "validation": "train"},
    }
    content["data"].update({"image_column": "image", "caption_column": "caption"})
    (folder / "project.toml").write_text(dumps_toml(content), encoding="utf-8")
    return Setup(["info", str(folder)], "", app={"open": folder})


def _png(mode: str = "RGB", size: tuple[int, int] = (8, 8)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def _images_no_metadata(folder: Path, assets: Assets) -> Setup:
    setup = _image_project(folder, assets, None, {"a.png": _png()})
    setup.expect = "metadata"
    return setup


def _images_missing_file(folder: Path, assets: Assets) -> Setup:
    meta = '{"file_name": "a.png", "caption": "x"}\n{"file_name": "gone.png", "caption": "y"}\n'
    setup = _image_project(folder, assets, meta, {"a.png": _png()})
    setup.expect = "gone.png"
    return setup


def _images_no_file_name(folder: Path, assets: Assets) -> Setup:
    meta = '{"path": "a.png", "caption": "x"}\n'
    setup = _image_project(folder, assets, meta, {"a.png": _png()})
    setup.expect = "file_name"
    return setup


def _images_no_caption(folder: Path, assets: Assets) -> Setup:
    meta = '{"file_name": "a.png", "text": "x"}\n'
    setup = _image_project(folder, assets, meta, {"a.png": _png()})
    setup.expect = "caption"
    return setup


def _sd_model(assets: Assets) -> tuple[Path, Path]:
    """A tiny random SD folder + LoRA file (from test_diffusion), built once per module."""
    from test_diffusion import make_sd_folder

    root = assets.root / "sd"
    if not (root / "lora").is_dir():
        return make_sd_folder(root)
    return root / "tiny-sd", next((root / "lora").iterdir())


def _sd_image_project(folder: Path, assets: Assets, images: dict[str, bytes]) -> Path:
    """A text-to-image project on the tiny SD model whose two splits hold ``images``."""
    base, lora_file = _sd_model(assets)
    for split in ("train", "validation"):
        target = folder / split
        target.mkdir(parents=True)
        rows = []
        for name, payload in images.items():
            (target / name).write_bytes(payload)
            rows.append(json.dumps({"file_name": name, "caption": f"picture {name}"}))
        (target / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    content = {
        "name": "images",
        "task": "text-to-image",
        "model": {"base": str(base), "adapter": str(lora_file.parent)},
        "data": {
            "train": "train",
            "validation": "validation",
            "image_column": "file_name",
            "caption_column": "caption",
            "max_length": 8,
        },  # fmt: skip
        "influence": {"batch_size": 4},
    }
    (folder / "project.toml").write_text(dumps_toml(content), encoding="utf-8")
    return folder


def _images_corrupt(folder: Path, assets: Assets) -> Setup:
    images = {"a.png": _png(size=(16, 16)), "b.png": b"\x89PNG\r\n\x1a\n not an image"}
    _sd_image_project(folder, assets, images)
    return Setup(["run", str(folder), "--no-progress"], "b.png")


def _images_truncated(folder: Path, assets: Assets) -> Setup:
    whole = _png(size=(16, 16))
    _sd_image_project(folder, assets, {"a.png": whole, "c.png": whole[: len(whole) // 2]})
    return Setup(["run", str(folder), "--no-progress"], "c.png")


# ---- the corpus ---------------------------------------------------------------------------------


def _rows(text: str) -> Callable[[Path], None]:
    return _csv_text(text)


CASES: dict[str, Callable[[Path, Assets], Setup]] = {
    # Paths.
    "missing-train-path": _new_case("not found", make_train=_missing_dir),
    "train-is-folder-without-metadata": _new_case("metadata", make_train=_folder_train),
    "unknown-format": _new_case("unknown format", make_train=_xlsx_train),
    "missing-project-folder": lambda folder, assets: Setup(
        ["info", str(folder / "nowhere")], "not found", app={"open": folder / "nowhere"}
    ),
    "folder-without-project-toml": lambda folder, assets: (
        folder.mkdir(parents=True),
        Setup(["info", str(folder)], "project.toml", app={"open": folder}),
    )[1],
    "missing-validation-file": lambda folder, assets: _info_case(
        folder, assets, "not found", data={"validation": "gone.csv"}
    ),
    # CSV.
    "csv-empty": _data_case(_csv_text(b""), "train.csv", "empty"),
    "csv-whitespace-only": _data_case(_csv_text("\n  \n"), "train.csv", "empty"),
    "csv-header-only": _data_case(_rows("text,label\n"), "train.csv", "no data rows"),
    "csv-ragged-row": _data_case(
        _rows("text,label\ngood film,positive\nbad,film,negative\n"), "train.csv", "row 3"
    ),
    "csv-short-row": _data_case(
        _rows("text,label\ngood film,positive\nbad film\n"), "train.csv", "row 3"
    ),
    "csv-unclosed-quote": _data_case(
        _rows('text,label\n"good film,positive\nbad film,negative\n'), "train.csv", "csv"
    ),
    "csv-duplicate-columns": _data_case(
        _rows("text,label,label\ngood,positive,positive\n"), "train.csv", "duplicate column"
    ),
    "csv-empty-column-name": _data_case(
        _rows("text,,label\ngood,x,positive\n"), "train.csv", "empty column name"
    ),
    "csv-not-utf8": _data_case(
        _csv_text("text,label\ncafé crème,positive\n".encode("latin-1")), "train.csv", "utf-8"
    ),
    "csv-semicolon-delimited": _data_case(
        _rows("text;label\ngood film;positive\n"), "train.csv", "no column"
    ),
    "csv-missing-text-column": _frame_case(
        lambda df: df.rename(columns={"text": "sentence"}), "no column 'text'"
    ),
    "csv-misnamed-label-column": _frame_case(
        lambda df: df, "no column 'target'", label_column="target"
    ),
    "csv-empty-text-value": _frame_case(
        lambda df: df.assign(text=[""] + df["text"].tolist()[1:]), "empty in 1 row"
    ),
    "csv-label-outside-set": _frame_case(
        lambda df: df.assign(label=["neutral"] + df["label"].tolist()[1:]), "neutral"
    ),
    "csv-duplicate-ids": _frame_case(
        lambda df: df.assign(id=[1, 1] + list(range(2, len(df)))), "more than once"
    ),
    # JSONL.
    "jsonl-malformed-line": _data_case(
        _rows('{"text": "good", "label": "positive"}\n{"text": "bad", "label": \n'),
        "train.jsonl",
        "line 2",
    ),
    "jsonl-array-record": _data_case(_rows('["good", "positive"]\n'), "train.jsonl", "record 1"),
    "jsonl-empty": _data_case(_csv_text(b""), "train.jsonl", "empty"),
    "json-array-malformed": _data_case(
        _rows('[{"text": "good", "label": "positive"},'), "train.jsonl", "not valid json"
    ),
    "jsonl-not-utf8": _data_case(
        _csv_text('{"text": "caf\xe9", "label": "positive"}\n'.encode("latin-1")),
        "train.jsonl",
        "utf-8",
    ),
    "jsonl-missing-column": _frame_case(lambda df: df.drop(columns=["label"]), "label", "jsonl"),
    "jsonl-label-outside-set": _frame_case(
        lambda df: df.assign(label=["maybe"] * len(df)), "maybe", "jsonl"
    ),
    # Parquet.
    "parquet-random-bytes": _data_case(
        _csv_text(b"PAR1" + b"\x07" * 300), "train.parquet", "parquet"
    ),
    "parquet-truncated": lambda folder, assets: _truncated_parquet(folder, assets),
    "parquet-empty-file": _data_case(_csv_text(b""), "train.parquet", "empty"),
    "parquet-zero-rows": _frame_case(lambda df: df.iloc[:0], "no data rows", "parquet"),
    "parquet-missing-column": _frame_case(
        lambda df: df.drop(columns=["text"]), "no column 'text'", "parquet"
    ),
    # Images.
    "images-no-metadata": _images_no_metadata,
    "images-missing-file": _images_missing_file,
    "images-no-file-name": _images_no_file_name,
    "images-no-caption-column": _images_no_caption,
    "images-corrupt-file": _images_corrupt,
    "images-truncated-file": _images_truncated,
    # Adapters and models.
    "adapter-of-another-base": _new_case("trained on base model", adapter="other"),
    "adapter-without-lora-tensors": _new_case("no lora tensors", make_adapter=_adapter_no_lora),
    "adapter-without-config": _new_case("adapter_config.json", make_adapter=_adapter_no_config),
    "adapter-config-not-json": _new_case("not valid json", make_adapter=_adapter_bad_json),
    "adapter-without-weights": _new_case("adapter_model", make_adapter=_adapter_no_weights),
    "adapter-truncated-weights": _new_case("cannot be read", make_adapter=_adapter_truncated),
    "adapter-task-mismatch": _new_case("task_type", make_adapter=_adapter_wrong_task),
    "adapter-pickle-only": _new_case("pickle", make_adapter=_adapter_pickle_only),
    "base-pickle-only": _pickle_base,
    "task-does-not-fit-model": _task_model_mismatch,
    # project.toml.
    "toml-unknown-top-key": _toml_case(GOOD_TOML.replace("task =", "colour = 1\ntask ="), "colour"),
    "toml-unknown-model-key": _toml_case(
        GOOD_TOML.replace("[model]\n", "[model]\nlayers = 3\n"), "layers"
    ),
    "toml-unknown-table": _toml_case(GOOD_TOML + "\n[training]\nepochs = 3\n", "[training]"),
    "toml-wrong-type-int": _toml_case(GOOD_TOML + 'max_length = "128"\n', "max_length"),
    "toml-wrong-type-bool": _toml_case(
        GOOD_TOML.replace("[model]\n", '[model]\ntrust_remote_code = "yes"\n'), "trust_remote_code"
    ),
    "toml-wrong-type-labels": _toml_case(
        GOOD_TOML.replace('labels = ["negative", "positive"]', 'labels = "negative,positive"'),
        "labels",
    ),
    "toml-syntax-error": _toml_case(
        GOOD_TOML.replace('name = "bad input"', "name = bad input"), "toml"
    ),
    "toml-not-utf8": lambda folder, assets: _toml_latin1(folder, assets),
    "toml-unknown-task": _toml_case(
        GOOD_TOML.replace('"classification"', '"regression"'), "regression"
    ),
    "toml-missing-train": _toml_case(GOOD_TOML.replace('train = "train.csv"\n', ""), "train"),
    "toml-duplicate-labels": _toml_case(
        GOOD_TOML.replace('["negative", "positive"]', '["negative", "negative"]'), "twice"
    ),
    "toml-bad-dtype": _toml_case(
        GOOD_TOML.replace("[model]\n", '[model]\ndtype = "int4"\n'), "int4"
    ),
    # Run time.
    "nan-losses-float16-overflow": _nan_losses,
    "disk-full-gradient-store": _disk_full,
    "unknown-method": _unknown_method,
    "unknown-device": _bad_device,
    "negative-damping": _negative_damping,
    "export-over-train-file": _export_over_source,
    "export-over-project-toml": _export_over_toml,
    "export-unknown-run": _run_unknown_id,
}


def _truncated_parquet(folder: Path, assets: Assets) -> Setup:
    folder.mkdir(parents=True)
    path = folder / "train.parquet"
    _good_train(assets).to_parquet(path, index=False)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return _info_case(folder, assets, "parquet", data={"train": "train.parquet"})


def _toml_latin1(folder: Path, assets: Assets) -> Setup:
    setup = _toml_case(GOOD_TOML, "utf-8")(folder, assets)
    text = (folder / "project.toml").read_text(encoding="utf-8").replace("bad input", "café")
    (folder / "project.toml").write_bytes(text.encode("latin-1"))
    return setup


# ---- the three checks -------------------------------------------------------------------------


def _snapshot(*roots: Path) -> dict[Path, str]:
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                out[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _check_unchanged(before: dict[Path, str]) -> None:
    changed = [
        str(path)
        for path, digest in before.items()
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest
    ]
    assert not changed, f"source files changed or removed: {changed}"


def _run_app(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    for name in ("DATAINF_PROJECT", "DATAINF_OPEN_DEMO"):
        monkeypatch.delenv(name, raising=False)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    if "open" in setup.app:
        at.text_input(key="projects_open_path").set_value(str(setup.app["open"])).run()
        at.button(key="projects_open").click().run()
    else:
        if setup.app.get("task"):
            at.selectbox(key="create_task").set_value(setup.app["task"])
        for key, value in setup.app["create"].items():
            at.text_input(key=key).set_value(value)
        next(b for b in at.button if b.label == "Create project").click().run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert errors, "the app showed no st.error"
    if setup.expect:
        assert any(setup.expect.lower() in e.lower() for e in errors), errors
    at.run()  # the app keeps working
    assert not at.exception, [e.value for e in at.exception]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, assets, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "case"
    setup = CASES[case](folder, assets)
    before = _snapshot(folder, assets.root) if folder.exists() else _snapshot(assets.root)
    capsys.readouterr()
    with monkeypatch.context() as patch:
        if setup.monkeypatch is not None:
            setup.monkeypatch(patch)
        status = cli.main(setup.argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status != 0, (case, captured.out, captured.err)
    assert len(lines) == 1, f"expected one stderr line, got: {captured.err!r}"
    message = lines[0]
    assert message.startswith("error: ") and "Traceback" not in captured.err, message
    assert setup.expect.lower() in message.lower(), message
    assert FIX_WORDS.search(message.split(";", 1)[-1]), f"no fix named: {message}"
    if setup.after is not None:
        setup.after()
    _check_unchanged(before)
    if setup.app is not None:
        _run_app(setup, monkeypatch)
        _check_unchanged(before)


def test_corpus_size():
    assert len(CASES) >= 40


def test_mixed_image_modes_and_sizes_become_examples(tmp_path, assets):
    """Grey, palette, RGBA and RGB images of different sizes are converted, not refused."""
    from datainf_core import data, diffusion
    from datainf_core.project import load_project

    images = {
        "grey.png": _png("L", (8, 8)),
        "palette.png": _png("P", (20, 12)),
        "alpha.png": _png("RGBA", (33, 17)),
        "colour.png": _png("RGB", (16, 16)),
    }
    folder = _sd_image_project(tmp_path / "mixed", assets, images)
    before = _snapshot(folder)
    project = load_project(folder)
    bundle = diffusion.load_diffusion(project, device="cpu")
    examples = diffusion.build_image_examples(project, data.load_split(project, "train"), bundle)
    shapes = {tuple(example["pixel_values"].shape) for example in examples}
    assert shapes == {(bundle.image_channels, bundle.image_size, bundle.image_size)}
    _check_unchanged(before)
