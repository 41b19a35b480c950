"""Reading train/validation tables and turning rows into per-sample examples.

Formats: CSV (``.csv``/``.tsv``), JSON Lines (``.jsonl``/``.json`` with one object per line),
Parquet (``.parquet``/``.pq``) and Hugging Face's *imagefolder* (a folder with ``metadata.jsonl`` or
``metadata.csv`` whose ``file_name`` column names the images; an ``image`` column of absolute paths
is added). Every problem raises :class:`~datainf_core.errors.DataError` with a one-line message.

Examples follow ARCHITECTURE.md: classification ``{"input_ids": LongTensor(T), "labels":
LongTensor(())}``; generation ``{"input_ids": LongTensor(T), "labels": LongTensor(T)}`` with ``-100``
where the loss ignores a token. Text-to-image examples come from ``diffusion.build_image_examples``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from datainf_core.errors import DataError

if TYPE_CHECKING:
    import torch

    from datainf_core.project import Project

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CSV_SUFFIXES = (".csv", ".tsv")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
SPLITS = ("train", "validation")


def label_to_str(value: Any) -> str:
    """The label as the project's ``labels`` list spells it (``1.0`` → ``"1"``, ``True`` → ``"True"``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _short(exc: BaseException) -> str:
    """First line of an exception message, trimmed for a one-line error."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _read_text(path: Path, what: str) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{what} {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); "
            "re-save it as UTF-8"
        ) from exc


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    text = _read_text(path, what)
    if not text.strip():
        raise DataError(f"{what} {path} is empty; it needs a header row and at least one data row")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        rows = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        header = next(rows)
        width = len(header)
        for number, row in enumerate(rows, start=2):
            if row and len(row) != width:
                raise DataError(
                    f"{what} {path}: row {number} has {len(row)} fields but the header has "
                    f"{width}; fix that row (quote fields that contain {delimiter!r})"
                )
    except csv.Error as exc:
        raise DataError(f"{what} {path} is not valid CSV: {_short(exc)}; fix the file") from exc
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(
            f"{what} {path} has duplicate column names {duplicates}; give each column its own name"
        )
    if any(not name.strip() for name in header):
        raise DataError(f"{what} {path} has an empty column name in its header; name every column")
    try:
        return pd.read_csv(io.StringIO(text), sep=delimiter, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"{what} {path} is not valid CSV: {_short(exc)}; fix the file") from exc


def _read_jsonl(path: Path, what: str) -> pd.DataFrame:
    text = _read_text(path, what)
    if not text.strip():
        raise DataError(f"{what} {path} is empty; it needs one JSON object per line")
    stripped = text.lstrip()
    if stripped.startswith("["):  # a plain JSON array of objects is accepted too
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{what} {path} is not valid JSON: {exc.msg}; fix the file") from exc
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{what} {path}: line {number} is not valid JSON ({exc.msg}); write one JSON "
                    "object per line"
                ) from exc
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(
                f"{what} {path}: record {number} is {type(record).__name__}, not an object; "
                'write one object per line like {"text": ..., "label": ...}'
            )
    return pd.DataFrame.from_records(records)


def _read_parquet(path: Path, what: str) -> pd.DataFrame:
    if path.stat().st_size == 0:
        raise DataError(f"{what} {path} is empty; write a Parquet file with at least one row")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(
            f"{what} {path} is not a readable Parquet file ({_short(exc)}); re-export it"
        ) from exc


def _read_imagefolder(path: Path, what: str) -> pd.DataFrame:
    metadata = next((path / name for name in METADATA_FILES if (path / name).is_file()), None)
    if metadata is None:
        raise DataError(
            f"{what} {path} is a folder without metadata.jsonl or metadata.csv; add one with a "
            "file_name column and a caption column"
        )
    df = _read_jsonl(metadata, what) if metadata.suffix == ".jsonl" else _read_csv(metadata, what)
    if "file_name" not in df.columns:
        raise DataError(
            f"{what} {metadata} has no file_name column (columns: {', '.join(map(str, df.columns))}"
            "); add file_name with each image's path relative to the folder"
        )
    if "image" not in df.columns:
        df["image"] = [str(path / str(name)) for name in df["file_name"]]
    return df


def load_table(path: str | os.PathLike[str], *, what: str = "data file") -> pd.DataFrame:
    """Reads a CSV, JSONL, Parquet file or an imagefolder into a DataFrame.

    Args:
        path: The file or imagefolder.
        what: How messages name the file, e.g. ``"train file"``.

    Raises:
        DataError: Missing or unreadable path, unknown format, malformed or empty content.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{what} not found: {path}; check the path")
    if path.is_dir():
        df = _read_imagefolder(path, what)
    else:
        suffix = path.suffix.lower()
        try:
            if suffix in CSV_SUFFIXES:
                df = _read_csv(path, what)
            elif suffix in JSONL_SUFFIXES:
                df = _read_jsonl(path, what)
            elif suffix in PARQUET_SUFFIXES:
                df = _read_parquet(path, what)
            else:
                raise DataError(
                    f"{what} {path} has an unknown format {suffix or '(no suffix)'!r}; use .csv, "
                    ".jsonl or .parquet, or an imagefolder"
                )
        except PermissionError as exc:
            raise DataError(
                f"{what} {path} cannot be read (permission denied); fix its permissions"
            ) from exc
    if len(df) == 0:
        raise DataError(f"{what} {path} has no data rows; add at least one row")
    logger.debug("read %d rows x %d columns from %s", len(df), len(df.columns), path)
    return df


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _column_settings(project: Project) -> list[tuple[str, str]]:
    """(setting name, column name) pairs the task reads (optional category included)."""
    from datainf_core.project import REQUIRED_COLUMNS

    names = list(REQUIRED_COLUMNS[project.task])
    if project.data.category_column is not None:
        names.append("category_column")
    return [(name, getattr(project.data, name)) for name in names]


def validate_table(project: Project, df: pd.DataFrame, *, what: str, path: Path) -> None:
    """Checks that ``df`` has the task's columns, no missing values there, and known labels."""
    columns = [str(c) for c in df.columns]
    for setting, column in _column_settings(project):
        if column not in df.columns:
            raise DataError(
                f"{what} {path} has no column {column!r} ({setting} in project.toml); its "
                f"columns are: {', '.join(columns)}; fix {setting}"
            )
        missing = [i for i, value in enumerate(df[column].tolist()) if _is_missing(value)]
        if missing and setting != "category_column":
            raise DataError(
                f"{what} {path}: column {column!r} is empty in {len(missing)} row(s), first at row "
                f"{missing[0]}; fill or remove those rows"
            )
    if "id" in df.columns:
        duplicated = df["id"][df["id"].duplicated()].tolist()  # plain Python values
        if duplicated:
            raise DataError(
                f"{what} {path}: id {duplicated[0]!r} appears more than once; ids must be "
                "unique: fix or remove the duplicate rows"
            )
    if project.task == "classification":
        labels = project.data.labels or []
        known = set(labels)
        column = project.data.label_column
        for row, value in enumerate(df[column].tolist()):
            if label_to_str(value) not in known:
                raise DataError(
                    f"{what} {path}: row {row} has label {label_to_str(value)!r}, which is not in "
                    f"labels {labels}; add it to labels in project.toml or fix the row"
                )
    if project.task == "text-to-image":
        column = project.data.image_column
        base = path if path.is_dir() else path.parent
        for row, value in enumerate(df[column].tolist()):
            image = Path(str(value)).expanduser()
            image = image if image.is_absolute() else base / image
            if not image.is_file():
                raise DataError(
                    f"{what} {path}: row {row} names image {str(value)!r}, which does not exist "
                    f"at {image}; fix the path or remove the row"
                )


def load_split(project: Project, split: str) -> pd.DataFrame:
    """Reads the project's train or validation file and validates it against the settings.

    Args:
        project: The project.
        split: ``"train"`` or ``"validation"``.

    Returns:
        The table, rows in file order (row position = ``train_index`` / ``query_index``).

    Raises:
        DataError: Unreadable file, missing column, empty value, label outside ``labels``,
            duplicate id or missing image.
    """
    if split not in SPLITS:
        raise ValueError(f"split should be 'train' or 'validation', got {split!r}")
    path = project.train_path if split == "train" else project.validation_path
    what = f"{split} file"
    df = load_table(path, what=what)
    validate_table(project, df, what=what, path=path)
    return df.reset_index(drop=True)


def label_ids(project: Project, df: pd.DataFrame) -> torch.Tensor:
    """Class index of every row: position of its label in ``project.data.labels``.

    Returns:
        ``LongTensor(n)``.
    """
    import torch

    labels = project.data.labels or []
    index = {label: i for i, label in enumerate(labels)}
    column = project.data.label_column
    if column is None or column not in df.columns:
        raise DataError(f"the table has no label column {column!r}; set label_column in [data]")
    ids = []
    for row, value in enumerate(df[column].tolist()):
        key = label_to_str(value)
        if key not in index:
            raise DataError(
                f"row {row} has label {key!r}, which is not in labels {labels}; add it to labels "
                "in project.toml or fix the row"
            )
        ids.append(index[key])
    return torch.tensor(ids, dtype=torch.long)


def _token_ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _generation_example(
    tokenizer: Any, prompt: str, response: str, *, max_length: int, loss_tokens: str, row: int
) -> dict[str, torch.Tensor]:
    """Prompt tokens (with the tokenizer's special prefix) + response tokens + EOS.

    When too long, the response keeps at least half of ``max_length`` and the prompt keeps its
    last tokens (the ones next to the response).
    """
    import torch

    prompt_ids = _token_ids(tokenizer, prompt, special=True)
    response_ids = _token_ids(tokenizer, response, special=False)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        response_ids.append(int(eos))
    if len(prompt_ids) + len(response_ids) > max_length:
        keep_response = min(len(response_ids), max(max_length - len(prompt_ids), max_length // 2))
        response_ids = response_ids[:keep_response]
        keep_prompt = max_length - len(response_ids)
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :] if keep_prompt else []
    input_ids = torch.tensor(prompt_ids + response_ids, dtype=torch.long)  # (T,)
    labels = input_ids.clone()
    if loss_tokens == "response":
        labels[: len(prompt_ids)] = IGNORE_INDEX
    elif loss_tokens == "prompt":
        labels[len(prompt_ids) :] = IGNORE_INDEX
    # A causal LM never predicts position 0, so at least one label must come after it.
    if int((labels[1:] != IGNORE_INDEX).sum()) == 0:
        raise DataError(
            f"row {row}: no {loss_tokens} tokens left for the loss (prompt {len(prompt_ids)} "
            f"tokens, response {len(response_ids)}, max_length {max_length}); raise max_length "
            "or change loss_tokens"
        )
    return {"input_ids": input_ids, "labels": labels}


def build_examples(
    project: Project,
    df: pd.DataFrame,
    tokenizer: Any,
    *,
    loss_tokens: str | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenizes every row into an unpadded example (format in the module docstring).

    Args:
        project: The project (task, columns, labels, max_length).
        df: Rows from :func:`load_split`.
        tokenizer: A Hugging Face tokenizer (``load_tokenizer``).
        loss_tokens: For generation: ``"prompt"``, ``"response"`` or ``"all"`` (default: the
            project's ``[influence] loss_tokens``).

    Returns:
        One dict per row, in row order.
    """
    import torch

    max_length = project.data.max_length
    if project.task == "classification":
        ids = label_ids(project, df)
        texts = [str(v) for v in df[project.data.text_column].tolist()]
        encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        return [
            {"input_ids": torch.tensor(tokens, dtype=torch.long), "labels": ids[i].clone()}
            for i, tokens in enumerate(encoded)
        ]
    if project.task == "generation":
        mode = loss_tokens or project.influence.loss_tokens
        from datainf_core.project import LOSS_TOKENS

        if mode not in LOSS_TOKENS:
            raise DataError(
                f"loss_tokens {mode!r} is not valid; use one of {', '.join(LOSS_TOKENS)}"
            )
        prompts = df[project.data.prompt_column].tolist()
        responses = df[project.data.response_column].tolist()
        return [
            _generation_example(
                tokenizer, str(p), str(r), max_length=max_length, loss_tokens=mode, row=row
            )
            for row, (p, r) in enumerate(zip(prompts, responses, strict=True))
        ]
    raise ValueError(
        f"build_examples handles classification and generation, not {project.task!r}; use "
        "diffusion.build_image_examples for text-to-image"
    )
