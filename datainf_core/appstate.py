"""Plain helpers behind the Streamlit pages: opening, background jobs, queues, paging, shortcuts.

The pages in ``pages/`` stay thin: everything here is ordinary Python that unit tests reach without
a browser. Long jobs the app starts (building a demo, retraining on the cleaned set) run in a worker
process (``python -m datainf_core.appstate ...``) that writes its progress to a JSON status file;
the page polls that file, so a reload or a server restart finds the job again. Influence runs have
their own worker in :mod:`datainf_core.runs`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datainf_core import runs
from datainf_core.errors import DataInfError

logger = logging.getLogger(__name__)

DEMO_KINDS: tuple[str, ...] = ("text", "generation", "image")
STATUSES: tuple[str, ...] = ("unreviewed", "keep", "relabel", "exclude", "needs_review")
STATUS_NAMES: dict[str, str] = {
    "unreviewed": "Unreviewed",
    "keep": "Keep",
    "relabel": "Relabel",
    "exclude": "Exclude",
    "needs_review": "Needs review",
}
# Keyboard shortcuts of the Review page: key → button key on the page.
# Not "r" or "c": Streamlit itself reruns the app on R and clears caches on C, and a rerun that
# races a shortcut's button click replays the click (one key press, two decisions).
REVIEW_KEYS: dict[str, str] = {
    "k": "review_keep",
    "l": "review_relabel",
    "x": "review_exclude",
    "q": "review_needs_review",
    "n": "review_next",
    "p": "review_previous",
    "u": "review_undo",
    "y": "review_redo",
}
REVIEW_KEY_HELP: dict[str, str] = {
    "k": "keep",
    "l": "relabel (to the label shown)",
    "x": "exclude",
    "q": "needs review (queue for later)",
    "n": "next sample",
    "p": "previous sample",
    "u": "undo",
    "y": "redo",
}
SIGN_EXPLANATION = (
    "**Reading the scores.** A score estimates how the loss on the chosen validation sample would "
    "change if the training sample were given more weight. **Positive = harmful**: that training "
    "sample pushes the model away from the right answer here (a typical sign of a wrong label). "
    "**Negative = helpful**: it supports the right answer. Scores compare within one method; their "
    "scale depends on the method and the damping."
)
# What the generation loss covers decides which question the scores answer (README: "Generation:
# which tokens the loss covers").
LOSS_TOKENS_MEANING: dict[str, str] = {
    "prompt": "the loss covers the **prompt** tokens (the published DataInf code's choice): "
    "training samples whose prompts resemble this one's, i.e. the same kind of task",
    "response": "the loss covers the **response** tokens: what shaped this answer; large-gradient "
    "samples crowd every top list, so compare with the `_cosine` methods",
    "all": "the loss covers **all** tokens, prompt and response",
}


def loss_tokens_caption(settings: Mapping[str, Any]) -> str | None:
    """A one-line reading of a generation run's loss-token setting (None if it has none).

    Args:
        settings: The run's ``settings.json`` (its top-level ``loss_tokens`` is the resolved one).
    """
    tokens = settings.get("loss_tokens") or settings.get("settings", {}).get("loss_tokens")
    meaning = LOSS_TOKENS_MEANING.get(str(tokens))
    return f"In this run {meaning}." if meaning else None


SIGNAL_HELP: dict[str, str] = {
    "combined": "average of the percentile ranks of the unit-norm influence signals (*_cosine) "
    "and self-influence, which stayed near the best whether or not the model had memorised its "
    "flipped labels; the default ranking",
    "self_influence": "how strongly a sample influences its own loss (high = unusual or mislabelled)",
    "train_loss": "the adapted model's loss on the sample with its given label",
}


WEIGHTS_EXPLANATION = (
    "The *combined* ranking averages the percentile ranks of the signals listed, in these "
    "shares: the unit-norm (cosine) influence signals, which every run scores, and "
    "self-influence. On the text demo (2 seeds) this average stayed within 0.011 of the best "
    "single signal both when the model was stopped at its best validation loss and when it was "
    "trained until it fit its flipped labels. In the second regime the training loss fell "
    "0.04–0.06 behind, and plain DataInf and Hessian-free, whose scores grow with the gradient "
    "norm, fell to chance or below. Where the truth is known, each signal's measured AUC is "
    "beside it: trust what detects best on data like yours."
)


def weights_table(
    weights: Mapping[str, float], detection_auc: Mapping[str, float] | None = None
) -> pd.DataFrame:
    """The combined ranking's weights for display, largest share first.

    Args:
        weights: Signal → weight (``evaluation.json``'s ``combined_weights``).
        detection_auc: Signal → measured AUC, when the truth is known (adds a column).

    Returns:
        Columns ``signal``, ``weight`` and, with ``detection_auc``, ``measured AUC``.
    """
    table = pd.DataFrame({"signal": list(weights), "weight": [float(w) for w in weights.values()]})
    if detection_auc:
        table["measured AUC"] = [detection_auc.get(name, float("nan")) for name in table["signal"]]
    return table.sort_values("weight", ascending=False, kind="stable").reset_index(drop=True)


class AppError(DataInfError):
    """A request from the app cannot be served (unknown demo, bad path, no run yet)."""


# ---- opening projects ------------------------------------------------------------------------


def repo_root() -> Path:
    """The source checkout this package lives in (the folder holding ``app.py``)."""
    return Path(__file__).resolve().parent.parent


def demo_base() -> Path:
    """The folder holding the built demos: ``$DATAINF_DEMO_DIR`` or ``<repo>/demo-projects``."""
    configured = os.environ.get("DATAINF_DEMO_DIR", "").strip()
    return Path(configured).expanduser() if configured else repo_root() / "demo-projects"


def demo_root(kind: str, base: Path | None = None) -> Path:
    """Where the built-in demo ``kind`` lives: ``<demo base>/<kind>`` (see :func:`demo_base`)."""
    if kind not in DEMO_KINDS:
        raise AppError(f"unknown demo {kind!r}; use one of {', '.join(DEMO_KINDS)}")
    return (base or demo_base()) / kind


def demo_status_path(kind: str, base: Path | None = None) -> Path:
    """The status file of the worker that builds demo ``kind``."""
    root = demo_root(kind, base)
    return root.parent / f".{kind}-build.json"


def is_project(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a ``project.toml``."""
    return (Path(folder).expanduser() / "project.toml").is_file()


def demo_is_built(kind: str, base: Path | None = None) -> bool:
    """Whether demo ``kind`` is complete (its project file exists; the build renames it in last)."""
    return is_project(demo_root(kind, base))


def initial_target(env: Mapping[str, str]) -> tuple[str, str] | None:
    """What the app opens at start: ``("project", path)``, ``("demo", kind)`` or None.

    ``DATAINF_PROJECT`` (a project folder) wins over ``DATAINF_OPEN_DEMO`` (a demo name).
    """
    project = env.get("DATAINF_PROJECT", "").strip()
    if project:
        return ("project", str(Path(project).expanduser()))
    demo = env.get("DATAINF_OPEN_DEMO", "").strip().lower()
    if demo:
        if demo not in DEMO_KINDS:
            raise AppError(
                f"DATAINF_OPEN_DEMO={demo!r} is not a demo; use one of {', '.join(DEMO_KINDS)}"
            )
        return ("demo", demo)
    return None


def data_size(path: str | os.PathLike[str]) -> str:
    """A short size of a data file or folder, e.g. ``"2.1 MB"``."""
    path = Path(path)
    if path.is_dir():
        total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    elif path.exists():
        total = path.stat().st_size
    else:
        return "missing"
    for unit in ("B", "kB", "MB", "GB"):
        if total < 1000 or unit == "GB":
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1000
    return f"{total:.1f} GB"


def file_stamp(*paths: str | os.PathLike[str] | None) -> tuple[float, ...]:
    """Modification times of ``paths`` (0 for missing ones): a cache key that changes with them."""
    stamps = []
    for path in paths:
        if path is None:
            stamps.append(0.0)
            continue
        try:
            stamps.append(Path(path).stat().st_mtime)
        except OSError:
            stamps.append(0.0)
    return tuple(stamps)


# ---- background jobs (demo build, retraining) -----------------------------------------------


def write_status(path: Path, **fields: Any) -> None:
    """Merges ``fields`` into the JSON status file at ``path`` (atomic replace)."""
    current = read_status_file(path) or {}
    current.update(fields)
    current["updated"] = time.time()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(current, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_status_file(path: Path) -> dict[str, Any] | None:
    """The status dict written by a worker, or None if there is none (or it is unreadable)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def job_state(path: Path) -> dict[str, Any]:
    """The job's status with ``state`` corrected: a ``running`` job whose process died is ``failed``.

    Returns:
        A dict with at least ``state`` (``"missing"``, ``"running"``, ``"done"``, ``"failed"``),
        ``done``, ``total``, ``stage`` and ``error``.
    """
    status = read_status_file(path)
    if status is None:
        return {"state": "missing", "done": 0, "total": 0, "stage": "", "error": None}
    status.setdefault("done", 0)
    status.setdefault("total", 0)
    status.setdefault("stage", "")
    status.setdefault("error", None)
    if status.get("state") == "running" and not runs.process_alive(status.get("pid")):
        status["state"] = "failed"
        status["error"] = status.get("error") or "the worker process stopped unexpectedly"
    return status


def progress_fraction(status: Mapping[str, Any]) -> float:
    """``done / total`` clipped to [0, 1] (0 when the total is unknown)."""
    total = float(status.get("total") or 0)
    if total <= 0:
        return 0.0
    return min(max(float(status.get("done") or 0) / total, 0.0), 1.0)


def estimate_eta(status: Mapping[str, Any], now: float | None = None) -> float | None:
    """Seconds left, from the time per unit so far (None until there is progress)."""
    done = float(status.get("done") or 0)
    total = float(status.get("total") or 0)
    started = status.get("stage_started") or status.get("started")
    if done <= 0 or total <= 0 or not started:
        return None
    elapsed = (now or time.time()) - float(started)
    return max(elapsed / done * (total - done), 0.0)


def format_score(score: float) -> str:
    """A signed score for display: ``+1,234`` for large values, ``-0.0123`` for small ones."""
    if not math.isfinite(score):
        return str(score)
    if abs(score) >= 1000:
        return f"{score:+,.0f}"
    return f"{score:+.4g}"


def format_seconds(seconds: float | None) -> str:
    """``"1 h 02 min"``, ``"3 min 05 s"``, ``"12 s"``, or ``"–"`` for None."""
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def start_job(command: str, args: Sequence[str], status_path: Path) -> int:
    """Starts ``python -m datainf_core.appstate <command> ...`` detached; returns its pid.

    The worker's output goes to ``<status_path>.log``. A job already running there is not started
    twice (its pid is returned).
    """
    current = job_state(status_path)
    if current["state"] == "running":
        return int(current["pid"])
    status_path.parent.mkdir(parents=True, exist_ok=True)
    if status_path.exists():
        status_path.unlink()
    log_path = status_path.with_suffix(".log")
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "datainf_core.appstate",
                command,
                *args,
                "--status",
                str(status_path),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=str(repo_root()),
        )
    write_status(
        status_path, state="running", pid=proc.pid, started=time.time(), done=0, total=0,
        stage="starting", error=None, command=command,
    )  # fmt: skip
    logger.info("started %s job (pid %d), status in %s", command, proc.pid, status_path)
    return proc.pid


def _progress_writer(status_path: Path) -> Callable[..., None]:
    """A ``progress(done, total, stage=None)`` callback that writes the status file (≤ 4 per s)."""
    last = {"t": 0.0, "stage": None}

    def progress(done: int, total: int, stage: str | None = None) -> None:
        now = time.time()
        fields: dict[str, Any] = {"done": int(done), "total": int(total)}
        if stage is not None and stage != last["stage"]:
            last["stage"] = stage
            fields.update(stage=stage, stage_started=now)
        elif now - last["t"] < 0.25 and done < total:
            return
        last["t"] = now
        write_status(status_path, **fields)

    return progress


def start_demo_build(kind: str, base: Path | None = None) -> int:
    """Starts building demo ``kind`` in a worker process (see :func:`build_demo`)."""
    root = demo_root(kind, base)
    return start_job("build-demo", [kind, str(root)], demo_status_path(kind, base))


def build_demo(kind: str, root: Path, progress: Callable[..., None] | None = None) -> Path:
    """Builds demo ``kind`` into a scratch folder and renames it to ``root`` when complete.

    A half-built demo therefore never looks like a project; a stale scratch folder from an
    interrupted build is removed first.
    """
    import importlib

    module = importlib.import_module(f"datainf_core.demos.{kind}")
    builder = getattr(module, f"build_{kind}_demo")
    if is_project(root):
        return root
    scratch = root.with_name(f".{root.name}.building")
    if scratch.exists():
        shutil.rmtree(scratch)
    builder(scratch, progress=progress)
    # Project files store paths relative to the project folder, so the rename keeps them valid.
    if root.exists():
        shutil.rmtree(root)
    os.replace(scratch, root)
    return root


def retrain_status_path(project: Any) -> Path:
    """Status file of the "retrain on the cleaned set" job of ``project``."""
    return Path(project.root) / "retrain" / "status.json"


def start_retrain(project: Any, *, drop_excluded: bool = True, apply_relabels: bool = True) -> int:
    """Starts retraining on the cleaned set in a worker (see :func:`retrain_on_cleaned`)."""
    args = [str(project.root)]
    if drop_excluded:
        args.append("--drop-excluded")
    if apply_relabels:
        args.append("--apply-relabels")
    return start_job("retrain", args, retrain_status_path(project))


def train_settings_of(adapter_path: Path | None) -> dict[str, Any]:
    """The training settings saved next to an adapter (``train_settings.json``), or ``{}``."""
    if adapter_path is None:
        return {}
    saved = read_status_file(Path(adapter_path) / "train_settings.json")
    return dict((saved or {}).get("settings", {}))


def retrain_on_cleaned(
    project: Any,
    *,
    drop_excluded: bool = True,
    apply_relabels: bool = True,
    progress: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Fine-tunes a fresh adapter on the cleaned train set and compares validation figures.

    "Before" is the project's adapter as it is; "after" is an adapter trained with the same
    settings (read from its ``train_settings.json``) on the export with excluded samples dropped
    and corrected labels applied. ``project.toml`` is not changed; the new adapter goes to
    ``<project>/retrain/<time>/adapter``.

    Returns:
        ``{"before": {val_loss, val_accuracy}, "after": {...}, "train_rows": int,
        "adapter_path": str, "seconds": float}``.
    """
    from datainf_core import export, train

    began = time.time()
    cleaned = export.cleaned_frame(
        project, drop_excluded=drop_excluded, apply_relabels=apply_relabels
    )
    train_df = cleaned.drop(columns=list(export.REVIEW_COLUMNS))
    if progress is not None:
        progress(0, 1, "evaluating the current adapter")
    before = train.evaluate_adapter(project) if project.adapter_path is not None else {}
    saved = train_settings_of(project.adapter_path)
    known = set(train.TrainSettings.__dataclass_fields__)
    settings = train.TrainSettings(**{k: v for k, v in saved.items() if k in known})
    out_dir = Path(project.root) / "retrain" / time.strftime("%Y%m%d-%H%M%S") / "adapter"
    result = train.train_adapter(
        project,
        settings,
        out_dir=out_dir,
        train_df=train_df,
        progress=progress,
        update_project=False,
    )
    after = {"val_loss": result.best_val_loss, "val_accuracy": result.val_accuracy}
    return {
        "before": dict(before),
        "after": after,
        "train_rows": len(train_df),
        "adapter_path": str(result.adapter_path),
        "seconds": time.time() - began,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point: ``python -m datainf_core.appstate {build-demo,retrain} ... --status F``."""
    parser = argparse.ArgumentParser(prog="python -m datainf_core.appstate")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("build-demo")
    demo.add_argument("kind", choices=DEMO_KINDS)
    demo.add_argument("root")
    demo.add_argument("--status", required=True)
    retrain = sub.add_parser("retrain")
    retrain.add_argument("project")
    retrain.add_argument("--drop-excluded", action="store_true")
    retrain.add_argument("--apply-relabels", action="store_true")
    retrain.add_argument("--status", required=True)
    args = parser.parse_args(argv)
    status_path = Path(args.status)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    write_status(status_path, state="running", pid=os.getpid())
    progress = _progress_writer(status_path)
    try:
        if args.command == "build-demo":
            build_demo(args.kind, Path(args.root), progress=progress)
            write_status(status_path, state="done", result={"root": args.root})
        else:
            from datainf_core.project import load_project

            outcome = retrain_on_cleaned(
                load_project(args.project),
                drop_excluded=args.drop_excluded,
                apply_relabels=args.apply_relabels,
                progress=progress,
            )
            write_status(status_path, state="done", result=outcome)
    except DataInfError as exc:
        write_status(status_path, state="failed", error=str(exc))
        return 2
    except BaseException as exc:  # the page shows the failure instead of a silent stop
        logger.exception("%s job failed", args.command)
        write_status(status_path, state="failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


# ---- review queue ----------------------------------------------------------------------------


def default_signal(columns: Sequence[str]) -> str | None:
    """The signal the queue sorts by first: ``combined`` if present, else the first one."""
    if "combined" in columns:
        return "combined"
    return columns[0] if columns else None


def suggest_label(original: Any, labels: Sequence[str] | None, predicted: Any = None) -> str | None:
    """The label a relabel pre-fills: the model's prediction if it differs from the given label,
    else in a binary task the other label, else the first other label.
    """
    if not labels:
        return None
    given = _label_str(original)
    names = [str(x) for x in labels]
    if predicted is not None and not _is_missing(predicted):
        guess = _label_str(predicted)
        if guess in names and guess != given:
            return guess
    others = [x for x in names if x != given]
    return others[0] if others else None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _label_str(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def preview_text(row: Mapping[str, Any], columns: Sequence[str], width: int = 160) -> str:
    """The row's text columns joined with `` → `` and cut to ``width`` characters."""
    parts = [str(row[c]) for c in columns if c in row and not _is_missing(row[c])]
    text = " → ".join(parts).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def text_columns(project: Any) -> list[str]:
    """The columns that hold a sample's content for its task (text, prompt+response, caption)."""
    data = project.data
    if project.task == "classification":
        names = [data.text_column]
    elif project.task == "generation":
        names = [data.prompt_column, data.response_column]
    else:
        names = [data.caption_column]
    return [n for n in names if n]


def queue_base(
    train_df: pd.DataFrame, *, label_column: str | None = None, content_columns: Sequence[str] = ()
) -> pd.DataFrame:
    """The parts of the queue that depend on the train table only (cache them across reruns).

    Returns:
        ``train_index, label, preview`` in file order.
    """
    n = len(train_df)
    base = pd.DataFrame({"train_index": np.arange(n, dtype=np.int64)})
    if label_column is not None and label_column in train_df.columns:
        base["label"] = pd.Series(_label_strings(train_df[label_column]), dtype=object)
    else:
        base["label"] = pd.Series([None] * n, dtype=object)
    columns = [c for c in content_columns if c in train_df.columns]
    base["preview"] = pd.Series(_previews(train_df, columns), dtype=object)
    return base


def build_queue(
    train_df: pd.DataFrame,
    signals: pd.DataFrame | None,
    decisions: pd.DataFrame,
    *,
    signal: str | None,
    label_column: str | None = None,
    content_columns: Sequence[str] = (),
    labels: Sequence[str] | None = None,
    predicted: pd.Series | None = None,
    base: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The review queue: one row per training sample, most suspicious first.

    The same as :func:`with_decisions` of :func:`queue_order`; a page that reruns on every
    decision caches the order and only overlays the decisions.

    Args:
        train_df: The train split (row position = ``train_index``).
        signals: The run's signals (``train_index`` + one column per signal), or None.
        decisions: Current review decisions (``ReviewStore.current()``).
        signal: The signal column to sort by (higher = more suspicious); None keeps file order.
        label_column: The classification label column, if any.
        content_columns: Columns shown as the preview text.
        labels: The project's labels (for the suggested relabel).
        predicted: Predicted label per ``train_index``, if the run saved one.
        base: :func:`queue_base` of ``train_df`` if already computed (it is the slow part).

    Returns:
        Columns ``train_index, rank, suspicion, label, status, corrected_label, suggested,
        preview``, sorted by ``suspicion`` descending.
    """
    if base is None:
        base = queue_base(train_df, label_column=label_column, content_columns=content_columns)
    order = queue_order(base, signals, signal=signal, labels=labels, predicted=predicted)
    return with_decisions(order, decisions)


def queue_order(
    base: pd.DataFrame,
    signals: pd.DataFrame | None,
    *,
    signal: str | None,
    labels: Sequence[str] | None = None,
    predicted: pd.Series | None = None,
) -> pd.DataFrame:
    """The queue without decisions: what changes only with the run, the signal or the data.

    Args:
        base: :func:`queue_base` of the train table.
        signals, signal, labels, predicted: As in :func:`build_queue`.

    Returns:
        Columns ``train_index, rank, suspicion, label, suggested, preview``, most suspicious first
        (NaN last, ties in file order).
    """
    n = len(base)
    suspicion = np.full(n, np.nan)
    if signals is not None and signal is not None and signal in signals.columns:
        suspicion = signals.set_index("train_index")[signal].reindex(range(n)).to_numpy(np.float64)
    suggested = _suggestions(base["label"], labels, predicted, n)
    order = np.lexsort((np.arange(n), np.nan_to_num(-suspicion, nan=np.inf)))
    columns = {
        "train_index": pd.Series(order.astype(np.int64)),
        "rank": pd.Series(np.arange(1, n + 1, dtype=np.int64)),
        "suspicion": pd.Series(suspicion[order]),
        "label": pd.Series(base["label"].to_numpy(dtype=object)[order], dtype=object),
        "suggested": pd.Series(suggested[order], dtype=object),
        "preview": pd.Series(base["preview"].to_numpy(dtype=object)[order], dtype=object),
    }
    return pd.DataFrame(columns)


def with_decisions(order: pd.DataFrame, decisions: pd.DataFrame) -> pd.DataFrame:
    """:func:`queue_order`'s table with each sample's ``status`` and ``corrected_label``.

    Args:
        order: Output of :func:`queue_order` (left unchanged).
        decisions: Current review decisions (``train_index, action, corrected_label``; rows
            outside the train set are ignored).

    Returns:
        The columns of :func:`build_queue`, in queue order.
    """
    n = len(order)
    status = np.full(n, "unreviewed", dtype=object)
    corrected = np.full(n, None, dtype=object)
    if len(decisions):
        position = np.empty(n, dtype=np.int64)
        position[order["train_index"].to_numpy()] = np.arange(n)
        index = decisions["train_index"].to_numpy(dtype=np.int64)
        inside = (index >= 0) & (index < n)
        where = position[index[inside]]
        status[where] = decisions["action"].to_numpy(dtype=object)[inside]
        corrected[where] = decisions["corrected_label"].to_numpy(dtype=object)[inside]
    queue = order[["train_index", "rank", "suspicion", "label"]].copy(deep=False)
    queue["status"] = pd.Series(status, index=order.index, dtype=object)
    queue["corrected_label"] = pd.Series(corrected, index=order.index, dtype=object)
    queue["suggested"] = order["suggested"]
    queue["preview"] = order["preview"]
    return queue


def _label_strings(values: pd.Series) -> np.ndarray:
    """Labels as the project spells them (``1.0`` → ``"1"``), vectorised over unique values."""
    uniques = pd.unique(values)
    spelled = {value: _label_str(value) for value in uniques}
    return values.map(spelled).to_numpy(dtype=object)


def _suggestions(
    given: pd.Series, labels: Sequence[str] | None, predicted: pd.Series | None, n: int
) -> np.ndarray:
    """:func:`suggest_label` per row, computed once per distinct (given, predicted) pair."""
    if not labels:
        return np.full(n, None, dtype=object)
    given = pd.Series(given.to_numpy(dtype=object), index=range(n))
    if predicted is None:
        codes, uniques = pd.factorize(given, use_na_sentinel=False)
        table = np.array([suggest_label(g, labels) for g in uniques] + [None], dtype=object)
        return table[codes]
    guess = predicted.reindex(range(n)).astype(object)
    guess = guess.where(guess.notna(), None)
    pairs = pd.DataFrame({"given": given, "guess": guess})
    keys = pairs.drop_duplicates()
    keys["suggested"] = [
        suggest_label(g, labels, p) for g, p in zip(keys["given"], keys["guess"], strict=True)
    ]
    merged = pairs.merge(keys, on=["given", "guess"], how="left")
    return merged["suggested"].to_numpy(dtype=object)


def _previews(df: pd.DataFrame, columns: Sequence[str], width: int = 160) -> np.ndarray:
    """:func:`preview_text` per row, vectorised with pandas string methods."""
    if not columns:
        return np.full(len(df), "", dtype=object)
    parts = [df[c].astype(object).where(df[c].notna(), "").astype(str) for c in columns]
    text = parts[0]
    for part in parts[1:]:
        text = text.str.cat(part, sep=" → ")
    text = text.str.replace("\n", " ", regex=False)
    long = text.str.len() > width
    text = text.where(~long, text.str.slice(0, width - 1) + "…")
    return text.to_numpy(dtype=object)


def filter_queue(
    queue: pd.DataFrame,
    *,
    labels: Sequence[str] | None = None,
    statuses: Sequence[str] | None = None,
    threshold: float | None = None,
    search: str = "",
) -> pd.DataFrame:
    """Rows of ``queue`` matching every filter (an empty filter matches everything).

    Args:
        queue: Output of :func:`build_queue`.
        labels: Keep samples whose given label is one of these.
        statuses: Keep samples whose status is one of :data:`STATUSES` listed here.
        threshold: Keep samples with ``suspicion >= threshold``.
        search: Keep samples whose preview contains this text (case-insensitive).
    """
    mask = pd.Series(True, index=queue.index)
    if labels:
        mask &= queue["label"].isin([str(x) for x in labels])
    if statuses:
        unknown = sorted(set(statuses) - set(STATUSES))
        if unknown:
            raise AppError(
                f"unknown review status {unknown[0]!r}; use one of {', '.join(STATUSES)}"
            )
        mask &= queue["status"].isin(list(statuses))
    if threshold is not None:
        mask &= queue["suspicion"] >= threshold
    if search.strip():
        mask &= queue["preview"].str.contains(search.strip(), case=False, regex=False, na=False)
    return queue[mask]


def page_bounds(n_rows: int, page: int, page_size: int) -> tuple[int, int, int, int]:
    """Slice of page ``page`` (1-based, clamped): ``(start, stop, page, n_pages)``."""
    if page_size < 1:
        raise AppError(f"page size {page_size} is too small; use at least 1 row per page")
    n_pages = max(1, math.ceil(n_rows / page_size))
    page = min(max(int(page), 1), n_pages)
    start = (page - 1) * page_size
    return start, min(start + page_size, n_rows), page, n_pages


def step_cursor(order: Sequence[int], current: int | None, step: int) -> int | None:
    """The train_index ``step`` places after ``current`` in ``order`` (clamped at both ends).

    With ``current`` not in ``order`` (e.g. filtered out after a decision), the first item is
    returned.
    """
    if not len(order):
        return None
    items = list(order)
    if current is None or current not in items:
        return int(items[0])
    position = min(max(items.index(current) + step, 0), len(items) - 1)
    return int(items[position])


def next_after_decision(order: Sequence[int], current: int) -> int | None:
    """The sample to show after a decision on ``current``: the next one in ``order``, if any."""
    items = list(order)
    if current not in items:
        return int(items[0]) if items else None
    position = items.index(current)
    if position + 1 < len(items):
        return int(items[position + 1])
    return int(items[position - 1]) if position > 0 else None


def selected_indices(page: pd.DataFrame, rows: Sequence[int]) -> list[int]:
    """The ``train_index`` values of the selected row positions of a shown page."""
    positions = [int(r) for r in rows if 0 <= int(r) < len(page)]
    return [int(page["train_index"].iloc[p]) for p in positions]


def shortcut_script(keys: Mapping[str, str], *, scope: str = "datainf-review") -> str:
    """HTML+JS for ``st.components.v1.html`` that clicks a page button when its key is pressed.

    Keys typed into a text field, or with Ctrl/Alt/Meta held, are ignored. The handler lives on the
    parent page and replaces an earlier one, so reruns do not stack handlers.

    Args:
        keys: Key (one character, lower case) → Streamlit widget key of the button.
        scope: Name under which the handler is stored on the parent window.
    """
    mapping = json.dumps({k.lower(): v for k, v in keys.items()})
    return f"""<script>
(function() {{
  const doc = window.parent.document;
  const keys = {mapping};
  const name = {json.dumps(scope)};
  if (window.parent[name]) {{ doc.removeEventListener('keydown', window.parent[name], true); }}
  const handler = function(event) {{
    if (event.ctrlKey || event.altKey || event.metaKey) return;
    const target = event.target;
    const tag = (target && target.tagName || '').toLowerCase();
    if (tag === 'input' || tag === 'textarea' || tag === 'select' || (target && target.isContentEditable)) return;
    const widget = keys[(event.key || '').toLowerCase()];
    if (!widget) return;
    const button = doc.querySelector('.st-key-' + widget + ' button');
    if (!button || button.disabled) return;
    event.preventDefault();
    event.stopPropagation();  // the key is ours: no other page handler acts on it too
    button.click();
  }};
  window.parent[name] = handler;
  doc.addEventListener('keydown', handler, true);
}})();
</script>"""


def predict_labels(
    project: Any, model: Any, tokenizer: Any, df: pd.DataFrame, *, batch_size: int = 64
) -> pd.Series:
    """The label the adapted classifier predicts for every row of ``df`` (argmax of the logits).

    Args:
        project: A classification project (its ``labels`` give the class names).
        model: The adapted model (``models.load_adapted_model``), in eval mode.
        tokenizer: Its tokenizer.
        df: Rows to classify, e.g. the train split.
        batch_size: Rows per forward pass.

    Returns:
        Shape ``(len(df),)`` Series of label names, indexed by row position, named
        ``predicted_label``.
    """
    import torch

    from datainf_core import data
    from datainf_core.batching import collate_examples

    if project.task != "classification":
        raise AppError(f"predicted labels need a classification project, got task {project.task!r}")
    names = list(project.data.labels or [])
    examples = data.build_examples(project, df, tokenizer)
    device = next(model.parameters()).device
    pad_id = int(tokenizer.pad_token_id or 0)
    predicted: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate_examples(examples[start : start + batch_size], pad_token_id=pad_id)
            batch.pop("labels", None)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits  # batch x labels
            predicted.append(logits.argmax(dim=-1).cpu())
    ids = torch.cat(predicted).tolist() if predicted else []
    return pd.Series([names[i] for i in ids], index=range(len(ids)), name="predicted_label")


# ---- explorer ----------------------------------------------------------------------------------


def top_influences(
    per_query: pd.DataFrame, *, query_index: int, method: str, k: int = 5
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``k`` most helpful (most negative) and most harmful (most positive) training samples.

    Args:
        per_query: ``query_index, train_index, method, score`` rows.
        query_index: The validation sample.
        method: The influence method.
        k: How many of each.

    Returns:
        ``(helpful, harmful)``, each with ``train_index, score``; helpful sorted ascending,
        harmful descending.
    """
    rows = per_query[(per_query["query_index"] == query_index) & (per_query["method"] == method)]
    rows = rows[["train_index", "score"]]
    helpful = rows.nsmallest(k, "score").reset_index(drop=True)
    harmful = rows.nlargest(k, "score").reset_index(drop=True)
    return helpful, harmful


def search_rows(
    df: pd.DataFrame,
    *,
    text: str = "",
    columns: Sequence[str] = (),
    label_column: str | None = None,
    labels: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Rows of ``df`` whose ``columns`` contain ``text`` and whose label is among ``labels``."""
    mask = pd.Series(True, index=df.index)
    text = text.strip()
    if text:
        hit = pd.Series(False, index=df.index)
        for column in columns:
            if column in df.columns:
                hit |= df[column].astype(str).str.contains(text, case=False, regex=False, na=False)
        mask &= hit
    if labels and label_column is not None and label_column in df.columns:
        mask &= df[label_column].map(_label_str).isin([str(x) for x in labels])
    return df[mask]


def method_names(table: pd.DataFrame | None) -> list[str]:
    """The methods present in a ``scores`` / ``per_query`` table, in first-seen order."""
    if table is None or "method" not in table.columns:
        return []
    return list(dict.fromkeys(table["method"].astype(str).tolist()))


if __name__ == "__main__":
    raise SystemExit(main())
