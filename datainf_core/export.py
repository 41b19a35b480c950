"""Export of the reviewed training set: the input's columns plus the review, as CSV, JSONL or Parquet.

Every exported row carries the original columns plus ``original_label``, ``corrected_label``,
``action``, ``score`` (the run's ``combined`` suspicion signal; positive = more suspicious) and
``reviewed_at``. Options drop the excluded samples and write the corrected labels into the label
column, which gives the cleaned set that fine-tuning can read directly.

Files are written atomically (temporary file in the same folder, then a rename) and never over a
source file of the project (train/validation data, ``project.toml``, the review database, the
adapter).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from datainf_core.errors import DataInfError

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("csv", "jsonl", "parquet")
REVIEW_COLUMNS: tuple[str, ...] = (
    "original_label",
    "corrected_label",
    "action",
    "score",
    "reviewed_at",
)
_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


class ExportError(DataInfError):
    """An export cannot be written (bad format, path over a source file, unwritable folder)."""


def infer_format(out_path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The export format: ``fmt`` if given, else from the file suffix.

    Args:
        out_path: Where the file goes.
        fmt: ``"csv"``, ``"jsonl"``, ``"parquet"`` or None (use the suffix).
    """
    if fmt is not None:
        fmt = fmt.lower().lstrip(".")
        if fmt not in FORMATS:
            raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(out_path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise ExportError(
            f"cannot tell the export format from {str(out_path)!r}; end the name in .csv, .jsonl "
            "or .parquet, or pass fmt"
        )
    return _SUFFIXES[suffix]


def build_export_frame(
    train_df: pd.DataFrame,
    decisions: pd.DataFrame,
    *,
    label_column: str | None = None,
    scores: pd.Series | None = None,
    drop_excluded: bool = False,
    apply_relabels: bool = False,
) -> pd.DataFrame:
    """Joins the training table with the review decisions and the suspicion score.

    Args:
        train_df: The train split as loaded; row ``i`` is training sample ``train_index = i``.
        decisions: Current decisions (``ReviewStore.current()``): ``train_index, action,
            corrected_label, note, reviewed_at``.
        label_column: The label column of a classification project (None for other tasks).
        scores: Suspicion score per ``train_index`` (index), e.g. the run's ``combined`` signal.
        drop_excluded: Leave out samples whose decision is ``"exclude"``.
        apply_relabels: Write ``corrected_label`` into ``label_column`` for relabelled samples.

    Returns:
        The input's columns, in order, plus :data:`REVIEW_COLUMNS`, with the original row order.
    """
    clashes = [c for c in REVIEW_COLUMNS if c in train_df.columns]
    if clashes:
        raise ExportError(
            f"the train data already has a column named {clashes[0]!r}, which the export adds; "
            "rename that column in the data file"
        )
    if label_column is not None and label_column not in train_df.columns:
        raise ExportError(
            f"label column {label_column!r} is not in the train data (columns: "
            f"{', '.join(map(str, train_df.columns))}); fix [data] label_column in project.toml"
        )
    n = len(train_df)
    frame = train_df.reset_index(drop=True).copy()
    position = pd.RangeIndex(n)
    dec = decisions.set_index("train_index") if len(decisions) else None
    if dec is not None:
        outside = dec.index[(dec.index < 0) | (dec.index >= n)]
        if len(outside):
            logger.warning(
                "%d review decisions point past the %d training rows (first: %d); ignored",
                len(outside),
                n,
                int(outside[0]),
            )
        dec = dec.reindex(position)

    def column(name: str) -> pd.Series:
        if dec is None:
            return pd.Series([None] * n, index=position, dtype=object)
        return dec[name].astype(object).where(dec[name].notna(), None)

    frame["original_label"] = (
        frame[label_column].copy()
        if label_column is not None
        else pd.Series([None] * n, dtype=object)
    )
    frame["corrected_label"] = column("corrected_label")
    frame["action"] = column("action")
    if scores is None:
        frame["score"] = pd.Series([float("nan")] * n, dtype="float64")
    else:
        frame["score"] = pd.Series(scores, dtype="float64").reindex(position).to_numpy()
    frame["reviewed_at"] = column("reviewed_at")
    if apply_relabels and label_column is not None:
        frame[label_column] = _apply_relabels(frame[label_column], frame)
    if drop_excluded:
        frame = frame[frame["action"] != "exclude"].reset_index(drop=True)
    return frame


def _apply_relabels(labels: pd.Series, frame: pd.DataFrame) -> pd.Series:
    """The label column with corrected labels written in, kept in the original dtype if it fits."""
    relabel = (frame["action"] == "relabel") & frame["corrected_label"].notna()
    if not relabel.any():
        return labels
    merged = labels.astype(object).copy()
    merged[relabel] = frame.loc[relabel, "corrected_label"]
    try:
        return merged.astype(labels.dtype)
    except (TypeError, ValueError):
        return merged.astype(str)


def summarize_changes(frame: pd.DataFrame, *, total: int | None = None) -> dict[str, int]:
    """Counts for the export page: rows, reviewed, per action, rows dropped.

    Args:
        frame: Output of :func:`build_export_frame`.
        total: Rows of the train split before any were dropped (defaults to ``len(frame)``).
    """
    actions = frame["action"].value_counts().to_dict()
    rows = len(frame)
    total = rows if total is None else total
    return {
        "train_rows": int(total),
        "exported_rows": int(rows),
        "dropped": int(total - rows),
        "reviewed": int(frame["action"].notna().sum()),
        "keep": int(actions.get("keep", 0)),
        "relabel": int(actions.get("relabel", 0)),
        "exclude": int(actions.get("exclude", 0)),
        "needs_review": int(actions.get("needs_review", 0)),
    }


def frame_to_bytes(frame: pd.DataFrame, fmt: str) -> bytes:
    """Serialises ``frame`` in ``fmt`` (for a download button)."""
    fmt = infer_format("", fmt)
    if fmt == "csv":
        return frame.to_csv(index=False).encode("utf-8")
    if fmt == "jsonl":
        return frame.to_json(orient="records", lines=True, force_ascii=False).encode("utf-8")
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def write_table(
    frame: pd.DataFrame, out_path: str | os.PathLike[str], fmt: str | None = None
) -> Path:
    """Writes ``frame`` atomically: a temporary file in the target folder, then a rename.

    Args:
        frame: The table to write.
        out_path: The file to create or replace.
        fmt: ``"csv"``, ``"jsonl"``, ``"parquet"``, or None to use the suffix.

    Returns:
        The resolved path written.
    """
    path = Path(out_path).expanduser()
    fmt = infer_format(path, fmt)
    if path.is_dir():
        raise ExportError(f"export path {str(path)!r} is a folder; give a file name inside it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = frame_to_bytes(frame, fmt)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ExportError(
            f"cannot write the export to {str(path)!r} ({exc.strerror or exc}); choose a writable "
            "folder"
        ) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ExportError(
            f"cannot write the export to {str(path)!r} ({exc.strerror or exc}); free some space or "
            "choose another folder"
        ) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("exported %d rows to %s (%s)", len(frame), path, fmt)
    return path.resolve()


def source_paths(project: Any) -> list[Path]:
    """Files and folders of ``project`` that an export must never replace."""
    paths: list[Path] = []
    for name in ("train_path", "validation_path", "project_file", "reviews_path", "adapter_path"):
        try:
            value = getattr(project, name)
        except (AttributeError, DataInfError):
            continue
        if value is not None:
            paths.append(Path(value))
    if getattr(project, "base_is_local", False):  # a local base model folder is a source too
        paths.append(Path(project.base_location))
    reviews = getattr(project, "reviews_path", None)
    if reviews is not None:
        paths += [Path(f"{reviews}-wal"), Path(f"{reviews}-shm")]
    return paths


def check_not_source(project: Any, out_path: str | os.PathLike[str]) -> None:
    """Raises :class:`ExportError` if ``out_path`` is, or lies inside, a source of ``project``."""
    target = Path(out_path).expanduser().resolve()
    for source in source_paths(project):
        resolved = source.expanduser().resolve()
        same = target == resolved
        if not same and target.exists() and resolved.exists():
            same = os.path.samefile(target, resolved)
        inside = resolved.is_dir() and resolved in target.parents
        if same or inside:
            raise ExportError(
                f"refusing to write the export over the project's source {str(resolved)!r}; "
                "choose another file name, e.g. train_cleaned.csv"
            )


def load_decisions(project: Any) -> pd.DataFrame:
    """Current review decisions of ``project`` (empty if nothing was reviewed yet)."""
    from datainf_core.review import ReviewStore

    path = Path(project.reviews_path)
    if not path.exists():
        return pd.DataFrame(
            columns=["train_index", "action", "corrected_label", "note", "reviewed_at"]
        )
    return ReviewStore(path).current()


def load_run_scores(project: Any, run_id: str | None = None) -> pd.Series | None:
    """The run's ``combined`` signal per ``train_index`` (latest run if ``run_id`` is None)."""
    runs_dir = getattr(project, "runs_dir", None)
    if run_id is None and (runs_dir is None or not Path(runs_dir).is_dir()):
        return None
    from datainf_core import runs

    if run_id is None:
        run_id = runs.latest_run(project)
        if run_id is None:
            return None
    signals = runs.load_signals(project, run_id)
    if "combined" not in signals.columns:
        logger.warning("run %s has no 'combined' signal; exporting without scores", run_id)
        return None
    return signals.set_index("train_index")["combined"]


def cleaned_frame(
    project: Any,
    *,
    drop_excluded: bool = False,
    apply_relabels: bool = False,
    run_id: str | None = None,
    train_df: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The export table of ``project`` (see :func:`build_export_frame`), without writing it."""
    if train_df is None:
        from datainf_core.data import load_split

        train_df = load_split(project, "train")
    return build_export_frame(
        train_df,
        load_decisions(project),
        label_column=project.data.label_column if project.task == "classification" else None,
        scores=load_run_scores(project, run_id),
        drop_excluded=drop_excluded,
        apply_relabels=apply_relabels,
    )


def export_dataset(
    project: Any,
    out_path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    drop_excluded: bool = False,
    apply_relabels: bool = False,
    run_id: str | None = None,
) -> Path:
    """Writes the reviewed training set of ``project`` to ``out_path``.

    Args:
        project: An opened :class:`~datainf_core.project.Project`.
        out_path: The file to write; never a source file of the project.
        fmt: ``"csv"``, ``"jsonl"``, ``"parquet"``, or None to use the suffix of ``out_path``.
        drop_excluded: Leave out samples reviewed as ``"exclude"``.
        apply_relabels: Write corrected labels into the label column.
        run_id: The run whose ``combined`` signal fills ``score`` (default: the latest run).

    Returns:
        The resolved path written.
    """
    fmt = infer_format(out_path, fmt)
    check_not_source(project, out_path)
    frame = cleaned_frame(
        project, drop_excluded=drop_excluded, apply_relabels=apply_relabels, run_id=run_id
    )
    return write_table(frame, out_path, fmt)


def export_log(project: Any, out_path: str | os.PathLike[str], *, fmt: str | None = None) -> Path:
    """Writes the full review event log (decisions, undos, redos) of ``project`` to ``out_path``."""
    from datainf_core.review import ReviewStore

    fmt = infer_format(out_path, fmt)
    check_not_source(project, out_path)
    return write_table(ReviewStore(project.reviews_path).log(), out_path, fmt)
