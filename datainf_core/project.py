"""A project folder: ``project.toml`` (task, model, adapter, data, influence settings) plus results.

Layout of a project folder::

    project.toml        human-editable settings (this module reads, validates and writes it)
    runs/<run-id>/      one influence run each (runs.py)
    gradients/          the gradient store cache (store.py)
    reviews.sqlite      review decisions (review.py)

Paths inside ``project.toml`` are relative to the project folder (absolute paths also work).
Every user mistake raises :class:`~datainf_core.errors.ProjectError` with a one-line message.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from datainf_core.errors import ProjectError

logger = logging.getLogger(__name__)

TASKS = ("classification", "generation", "text-to-image")
DTYPES = ("float32", "float16", "bfloat16")
LOSS_TOKENS = ("prompt", "response", "all")
DIFFUSION_NOISE = ("shared", "per_sample")
PROJECT_FILE = "project.toml"

# Columns each task needs (the DataSettings field names).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "classification": ("text_column", "label_column"),
    "generation": ("prompt_column", "response_column"),
    "text-to-image": ("image_column", "caption_column"),
}
# Defaults filled in by create_project when a column setting is not given.
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "classification": {"text_column": "text", "label_column": "label"},
    "generation": {"prompt_column": "prompt", "response_column": "response"},
    "text-to-image": {"image_column": "image", "caption_column": "caption"},
}


@dataclass
class ModelSettings:
    """The ``[model]`` table: base model, LoRA adapter and how to load them safely."""

    base: str
    adapter: str | None = None
    dtype: str = "float32"
    gguf_file: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False


@dataclass
class DataSettings:
    """The ``[data]`` table: train/validation files and the columns the task reads."""

    train: str
    validation: str
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    category_column: str | None = None
    labels: list[str] | None = None
    max_length: int = 128


@dataclass
class InfluenceSettings:
    """The ``[influence]`` table: which tokens and adapter tensors the gradients cover."""

    loss_tokens: str = "response"
    include: list[str] | None = None
    batch_size: int = 16
    diffusion_noise: str = "shared"


# The TOML type each field accepts: "str", "bool", "int", "list[str]" ("?" = may be omitted).
_TYPES: dict[str, dict[str, str]] = {
    "": {"name": "str", "task": "str"},
    "model": {
        "base": "str",
        "adapter": "str?",
        "dtype": "str",
        "gguf_file": "str?",
        "trust_remote_code": "bool",
        "allow_pickle": "bool",
    },
    "data": {
        "train": "str",
        "validation": "str",
        "text_column": "str?",
        "label_column": "str?",
        "prompt_column": "str?",
        "response_column": "str?",
        "image_column": "str?",
        "caption_column": "str?",
        "category_column": "str?",
        "labels": "list[label]?",
        "max_length": "int",
    },
    "influence": {
        "loss_tokens": "str",
        "include": "list[str]?",
        "batch_size": "int",
        "diffusion_noise": "str",
    },
}
_TABLE_CLASSES: dict[str, type] = {
    "model": ModelSettings,
    "data": DataSettings,
    "influence": InfluenceSettings,
}


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader never sees a half-written file, and a crash leaves the old content in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        mode = path.stat().st_mode & 0o777  # keep the mode of the file being replaced
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_type(table: str, key: str, value: Any, expected: str) -> None:
    where = f"[{table}] {key}" if table else key
    kind = expected.rstrip("?")
    if kind == "str":
        ok = isinstance(value, str)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "list[label]":  # integer labels are accepted and kept as strings
        ok = isinstance(value, list) and all(
            isinstance(item, str) or (isinstance(item, int) and not isinstance(item, bool))
            for item in value
        )
    else:  # list[str]
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
    if not ok:
        shown = {"str": "a string", "bool": "true or false", "int": "an integer"}.get(
            kind, 'a list of strings like ["a", "b"]'
        )
        raise ProjectError(
            f"project.toml: {where} should be {shown}, got {value!r} ({_type_name(value)}); "
            f"fix it in {PROJECT_FILE}"
        )


def _parse_table(table: str, raw: Any) -> dict[str, Any]:
    """Checks one TOML table for unknown keys and wrong types; returns its values."""
    if not isinstance(raw, Mapping):
        raise ProjectError(
            f"project.toml: [{table}] should be a table, got {raw!r}; write it as a [{table}] section"
        )
    allowed = _TYPES[table]
    for key, value in raw.items():
        if key not in allowed:
            where = f"in [{table}]" if table else "at the top level"
            raise ProjectError(
                f"project.toml: unknown key {key!r} {where}; allowed keys: {', '.join(allowed)}"
            )
        _check_type(table, key, value, allowed[key])
    values = dict(raw)
    if isinstance(values.get("labels"), list):
        values["labels"] = [str(label) for label in values["labels"]]
    return values


def _is_local_path(value: str) -> bool:
    """Whether a model reference is a filesystem path rather than a hub id like ``org/name``."""
    return (
        os.path.isabs(value)
        or value.startswith(("./", "../", "~", ".\\", "..\\"))
        or value in (".", "..")
    )


@dataclass
class Project:
    """One project folder and its validated settings.

    Attributes:
        root: The project folder (absolute).
        name: Human-readable name.
        task: One of :data:`TASKS`.
        model: The ``[model]`` table.
        data: The ``[data]`` table.
        influence: The ``[influence]`` table.
    """

    root: Path
    name: str
    task: str
    model: ModelSettings
    data: DataSettings
    influence: InfluenceSettings = field(default_factory=InfluenceSettings)

    # ---- resolved paths -------------------------------------------------------------------
    def resolve(self, value: str | os.PathLike[str]) -> Path:
        """Resolves a path from ``project.toml`` (relative to :attr:`root`, ``~`` expanded)."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.root / path)

    @property
    def project_file(self) -> Path:
        return self.root / PROJECT_FILE

    @property
    def train_path(self) -> Path:
        return self.resolve(self.data.train)

    @property
    def validation_path(self) -> Path:
        return self.resolve(self.data.validation)

    @property
    def adapter_path(self) -> Path | None:
        return None if self.model.adapter is None else self.resolve(self.model.adapter)

    @property
    def base_location(self) -> str:
        """The base model as ``from_pretrained`` wants it: a resolved local folder or a hub id."""
        base = self.model.base
        local = self.resolve(base)
        if _is_local_path(base) or local.exists():
            return str(local)
        return base

    @property
    def base_is_local(self) -> bool:
        return _is_local_path(self.model.base) or self.resolve(self.model.base).exists()

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def reviews_path(self) -> Path:
        return self.root / "reviews.sqlite"

    @property
    def gradients_dir(self) -> Path:
        return self.root / "gradients"

    # ---- validation -----------------------------------------------------------------------
    def validate(self, check_files: bool = True) -> None:
        """Checks every setting; raises ProjectError naming the first bad field and its fix.

        Args:
            check_files: Also check that the train/validation files, the adapter folder and a
                local base model exist.
        """
        if not self.name.strip():
            raise ProjectError('project.toml: name is empty; give the project a name, e.g. "demo"')
        if self.task not in TASKS:
            raise ProjectError(
                f"project.toml: unknown task {self.task!r}; use one of {', '.join(TASKS)}"
            )
        if not self.model.base.strip():
            raise ProjectError(
                "project.toml: [model] base is empty; give a local model folder or a hub id"
            )
        if self.model.dtype not in DTYPES:
            raise ProjectError(
                f"project.toml: [model] dtype {self.model.dtype!r} is not supported; "
                f"use one of {', '.join(DTYPES)}"
            )
        if self.influence.loss_tokens not in LOSS_TOKENS:
            raise ProjectError(
                f"project.toml: [influence] loss_tokens {self.influence.loss_tokens!r} is not "
                f"valid; use one of {', '.join(LOSS_TOKENS)}"
            )
        if self.influence.diffusion_noise not in DIFFUSION_NOISE:
            raise ProjectError(
                f"project.toml: [influence] diffusion_noise {self.influence.diffusion_noise!r} is "
                f"not valid; use one of {', '.join(DIFFUSION_NOISE)}"
            )
        if self.influence.batch_size < 1:
            raise ProjectError(
                f"project.toml: [influence] batch_size must be at least 1, got "
                f"{self.influence.batch_size}; e.g. batch_size = 16"
            )
        if self.data.max_length < 2:
            raise ProjectError(
                f"project.toml: [data] max_length must be at least 2, got {self.data.max_length}; "
                "e.g. max_length = 128"
            )
        for column in REQUIRED_COLUMNS[self.task]:
            value = getattr(self.data, column)
            if value is None or not value.strip():
                raise ProjectError(
                    f"project.toml: [data] {column} is required for task {self.task!r}; "
                    f'add {column} = "<column name>" to [data]'
                )
        if check_files:
            self._validate_files()
        self._validate_labels()

    def _validate_labels(self) -> None:
        labels = self.data.labels
        if self.task != "classification":
            return
        if labels is None:
            raise ProjectError(
                "project.toml: [data] labels is required for classification; add e.g. labels = "
                '["negative", "positive"] (the order gives the class index)'
            )
        if len(labels) < 2:
            raise ProjectError(
                f"project.toml: [data] labels needs at least 2 classes, got {labels!r}; "
                "list every class"
            )
        seen: set[str] = set()
        for label in labels:
            if label in seen:
                raise ProjectError(
                    f"project.toml: [data] labels lists {label!r} twice; list each class once"
                )
            seen.add(label)

    def _validate_files(self) -> None:
        for split, path in (("train", self.train_path), ("validation", self.validation_path)):
            if not path.exists():
                raise ProjectError(
                    f"project.toml: [data] {split} file not found: {path}; fix the path (relative "
                    "to the project folder) or create the file"
                )
        adapter = self.adapter_path
        # A diffusers LoRA may be a single .safetensors file; PEFT adapters are folders.
        found = adapter is not None and (
            adapter.is_dir() or (self.task == "text-to-image" and adapter.is_file())
        )
        if adapter is not None and not found:
            raise ProjectError(
                f"project.toml: [model] adapter folder not found: {adapter}; fix the path or run "
                "`datainf train` to create one"
            )
        if self.base_is_local and not Path(self.base_location).exists():
            raise ProjectError(
                f"project.toml: [model] base model not found: {self.base_location}; fix the path "
                "or give a hub id like org/name"
            )
        if self.model.gguf_file is not None:
            gguf = Path(self.base_location) / self.model.gguf_file
            if self.base_is_local and not gguf.is_file():
                raise ProjectError(
                    f"project.toml: [model] gguf_file not found: {gguf}; fix the file name"
                )

    # ---- saving -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The ``project.toml`` content as nested dicts (None values left out)."""
        out: dict[str, Any] = {"name": self.name, "task": self.task}
        for table in ("model", "data", "influence"):
            settings = getattr(self, table)
            out[table] = {
                f.name: getattr(settings, f.name)
                for f in fields(settings)
                if getattr(settings, f.name) is not None
            }
        return out

    def save(self) -> Path:
        """Validates (without touching files) and writes ``project.toml`` atomically."""
        self.validate(check_files=False)
        write_atomic(self.project_file, dumps_toml(self.to_dict()))
        logger.info("saved %s", self.project_file)
        return self.project_file


# ---- TOML writing (flat tables of str/bool/int/float/list only) --------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string (same escapes).
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} ({_type_name(value)}) to TOML")


def dumps_toml(content: Mapping[str, Any]) -> str:
    """Writes top-level keys, then one ``[table]`` per nested mapping, in the given order."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in content.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None)
    return "\n".join(lines) + "\n"


# ---- loading and creating ----------------------------------------------------------------------
def parse_project(root: Path, raw: Mapping[str, Any]) -> Project:
    """Builds a Project from parsed TOML, raising ProjectError on unknown keys or wrong types."""
    top = {k: v for k, v in raw.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in raw.items() if isinstance(v, Mapping)}
    for key in tables:
        if key not in _TABLE_CLASSES:
            raise ProjectError(
                f"project.toml: unknown table [{key}]; allowed tables: [model], [data], [influence]"
            )
    _parse_table("", top)
    for key in ("name", "task"):
        if key not in top:
            raise ProjectError(f'project.toml: missing {key}; add {key} = "..." at the top')
    values: dict[str, Any] = {}
    for table, cls in _TABLE_CLASSES.items():
        content = _parse_table(table, tables.get(table, {}))
        required = [
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        ]
        for key in required:
            if key not in content:
                raise ProjectError(
                    f'project.toml: [{table}] {key} is missing; add {key} = "..." to [{table}]'
                )
        values[table] = cls(**content)
    return Project(root=root, name=top["name"], task=top["task"], **values)


def load_project(root: str | os.PathLike[str], *, check_files: bool = True) -> Project:
    """Reads and validates ``root/project.toml``.

    Raises:
        ProjectError: The folder or file is missing, the TOML is malformed, a key is unknown, a
            value has the wrong type, or a setting is invalid (one-line message).
    """
    root = Path(root).expanduser().resolve()
    path = root / PROJECT_FILE
    if not root.is_dir():
        raise ProjectError(
            f"project folder not found: {root}; create one with `datainf new {root} ...`"
        )
    if not path.is_file():
        raise ProjectError(
            f"no {PROJECT_FILE} in {root}; create a project with `datainf new {root} ...`"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ProjectError(f"{path} is not UTF-8 text ({exc.reason}); re-save it as UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        message = str(exc).splitlines()[0]
        raise ProjectError(f"{path} is not valid TOML: {message}; fix that line") from exc
    project = parse_project(root, raw)
    project.validate(check_files=check_files)
    return project


def _store_path(root: Path, value: str | os.PathLike[str]) -> str:
    """How a user-given path is written into project.toml.

    A path that exists relative to the project folder is kept as is; one that exists relative to
    the current directory is stored relative to the project (or absolute when outside it).
    """
    text = os.fspath(value)
    path = Path(text).expanduser()
    if path.is_absolute():
        absolute = path
    elif (root / path).exists():
        return path.as_posix()
    elif path.exists():
        absolute = path.resolve()
    else:
        return path.as_posix()
    try:
        return absolute.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(absolute.resolve())


def _infer_labels(project: Project) -> list[str] | None:
    """Sorted distinct label values of the train file (None when it cannot be read yet)."""
    from datainf_core.data import label_to_str, load_table

    column = project.data.label_column
    if column is None or not project.train_path.exists():
        return None
    df = load_table(project.train_path, what="train file")
    if column not in df.columns:
        return None
    values = {label_to_str(v) for v in df[column].dropna()}
    return sorted(values)


def create_project(
    root: str | os.PathLike[str],
    *,
    name: str | None = None,
    task: str,
    base: str,
    adapter: str | os.PathLike[str] | None = None,
    train: str | os.PathLike[str],
    validation: str | os.PathLike[str],
    overwrite: bool = False,
    **settings: Any,
) -> Project:
    """Creates ``root/project.toml`` and returns the validated project.

    Paths may be given relative to the project folder, relative to the current directory, or
    absolute. Column names default to ``text``/``label``, ``prompt``/``response`` or
    ``image``/``caption`` by task; ``labels`` default to the sorted distinct values of the train
    file's label column.

    Args:
        root: The project folder (created if missing).
        name: Project name (default: the folder name).
        task: One of :data:`TASKS`.
        base: Local model folder or hub id.
        adapter: PEFT adapter folder, or None until ``datainf train`` creates one.
        train: Train file (CSV/JSONL/Parquet, or an imagefolder).
        validation: Validation file.
        overwrite: Replace an existing ``project.toml``.
        **settings: Any other field of ModelSettings, DataSettings or InfluenceSettings.

    Raises:
        ProjectError: An unknown setting, an existing project, or an invalid value.
        ModelError: The adapter folder is not a LoRA adapter or was trained on another base.
    """
    root = Path(root).expanduser().resolve()
    if (root / PROJECT_FILE).exists() and not overwrite:
        raise ProjectError(
            f"{root} already has a {PROJECT_FILE}; pick another folder or delete that file"
        )
    if task not in TASKS:
        raise ProjectError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    tables: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "influence": {}}
    for key, value in settings.items():
        table = next((t for t in tables if key in _TYPES[t]), None)
        if table is None:
            raise ProjectError(f"unknown project setting {key!r}; see datainf new --help")
        if value is not None:
            tables[table][key] = value
    for column, default in DEFAULT_COLUMNS[task].items():
        tables["data"].setdefault(column, default)
    root.mkdir(parents=True, exist_ok=True)
    base_value = base
    if _is_local_path(base) or Path(base).expanduser().exists():
        base_value = _store_path(root, base)
    project = Project(
        root=root,
        name=name or root.name,
        task=task,
        model=ModelSettings(
            base=base_value,
            adapter=None if adapter is None else _store_path(root, adapter),
            **tables["model"],
        ),
        data=DataSettings(
            train=_store_path(root, train),
            validation=_store_path(root, validation),
            **tables["data"],
        ),
        influence=InfluenceSettings(**tables["influence"]),
    )
    if project.data.labels is not None:
        _check_type("data", "labels", project.data.labels, _TYPES["data"]["labels"])
        project.data.labels = [str(label) for label in project.data.labels]
    if task == "classification" and project.data.labels is None:
        project.data.labels = _infer_labels(project)
    for table in ("model", "data", "influence"):
        for key, value in tables[table].items():
            _check_type(table, key, value, _TYPES[table][key])
    project.validate(check_files=True)
    if project.adapter_path is not None and task != "text-to-image":
        from datainf_core.models import check_adapter_matches_base

        check_adapter_matches_base(project)  # ModelError: not an adapter, or another base's
    project.save()
    logger.info("created project %s (%s) in %s", project.name, task, root)
    return project
