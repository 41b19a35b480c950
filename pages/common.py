"""Streamlit helpers shared by the pages: the open project, cached loaders, run selection.

Logic lives in ``datainf_core`` (mostly ``appstate``); this file only wires it to Streamlit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from datainf_core import appstate
from datainf_core.errors import DataInfError

PROJECT_KEY = "project_root"


# ---- session ---------------------------------------------------------------------------------


def init_session() -> None:
    """On a session's first run, opens what the environment asks for (project or demo)."""
    if "session_initialised" in st.session_state:
        return
    st.session_state["session_initialised"] = True
    st.session_state.setdefault(PROJECT_KEY, None)
    try:
        target = appstate.initial_target(os.environ)
    except DataInfError as exc:
        st.session_state["startup_error"] = str(exc)
        return
    if target is None:
        return
    kind, value = target
    if kind == "project":
        st.session_state[PROJECT_KEY] = value
    elif appstate.demo_is_built(value):
        st.session_state[PROJECT_KEY] = str(appstate.demo_root(value))
    else:
        st.session_state["pending_demo"] = value


def ensure_app_ran() -> None:
    """Reruns through ``app.py`` when Streamlit ran a page file on its own.

    On a fresh server Streamlit's legacy ``pages/`` folder mode runs ``pages/<name>.py`` directly
    for a URL like ``/review`` until some session has called ``st.navigation``. Switching that mode
    off and rerunning sends the request through ``app.py`` (navigation, sidebar, opened project).
    """
    if "session_initialised" in st.session_state:
        return
    try:
        from streamlit.runtime.pages_manager import PagesManager

        PagesManager.uses_pages_directory = False
    except (ImportError, AttributeError):  # a Streamlit without the legacy mode
        init_session()
        return
    st.rerun()


def open_project(root: str | os.PathLike[str]) -> bool:
    """Validates and opens the project in ``root``; shows ``st.error`` and returns False if bad."""
    from datainf_core.project import load_project

    try:
        project = load_project(Path(str(root)).expanduser())
    except DataInfError as exc:
        st.error(str(exc))
        return False
    st.session_state[PROJECT_KEY] = str(project.root)
    for key in list(st.session_state.keys()):
        if str(key).startswith(("review_", "explorer_", "export_", "run_")):
            del st.session_state[key]
    return True


def current_project() -> Any | None:
    """The open project, or None (errors shown with ``st.error``)."""
    root = st.session_state.get(PROJECT_KEY)
    if not root:
        return None
    from datainf_core.project import load_project

    try:
        return load_project(root)
    except DataInfError as exc:
        st.error(str(exc))
        return None


def require_project() -> Any:
    """The open project; otherwise a hint to open one and ``st.stop()``."""
    project = current_project()
    if project is None:
        st.info("No project is open. Open or create one on the **Projects** page, or start a demo.")
        st.page_link("pages/projects.py", label="Go to Projects", icon=":material/folder_open:")
        st.stop()
    return project


# ---- cached loading ----------------------------------------------------------------------------


@st.cache_data(max_entries=8, show_spinner="Reading data…")
def _load_split(root: str, split: str, stamp: tuple[float, ...]) -> pd.DataFrame:
    from datainf_core.data import load_split
    from datainf_core.project import load_project

    return load_split(load_project(root), split)


def load_split(project: Any, split: str) -> pd.DataFrame | None:
    """The train or validation table (cached until the file or ``project.toml`` changes)."""
    path = project.train_path if split == "train" else project.validation_path
    try:
        return _load_split(
            str(project.root), split, appstate.file_stamp(path, project.project_file)
        )
    except DataInfError as exc:
        st.error(str(exc))
        return None


@st.cache_data(max_entries=4, show_spinner=False)
def _queue_base(root: str, stamp: tuple[float, ...]) -> pd.DataFrame:
    from datainf_core.project import load_project

    project = load_project(root)
    label_col = project.data.label_column if project.task == "classification" else None
    return appstate.queue_base(
        _load_split(root, "train", stamp),
        label_column=label_col,
        content_columns=appstate.text_columns(project),
    )


def queue_base(project: Any) -> pd.DataFrame:
    """Labels and previews of the train rows for the review queue (cached per train file)."""
    return _queue_base(
        str(project.root), appstate.file_stamp(project.train_path, project.project_file)
    )


def review_order(
    project: Any,
    run_id: str | None,
    signal: str | None,
    signals: pd.DataFrame | None,
    predicted: pd.Series | None,
) -> pd.DataFrame:
    """:func:`appstate.queue_order` for the Review page, kept in the session between reruns.

    A decision reruns the page; the order only changes with the run, the signal, the data or
    the adapter, so only the decisions are overlaid on each rerun.
    """
    paths = [project.train_path, project.project_file]
    if run_id:
        paths.append(Path(project.runs_dir) / run_id / "signals.parquet")
    if project.adapter_path is not None:
        paths.append(Path(project.adapter_path) / "adapter_model.safetensors")
    key = (str(project.root), run_id, signal, appstate.file_stamp(*paths), predicted is None)
    cached = st.session_state.get("review_order_cache")
    if cached is None or cached[0] != key:
        labels = project.data.labels if project.task == "classification" else None
        order = appstate.queue_order(
            queue_base(project), signals, signal=signal, labels=labels, predicted=predicted
        )
        st.session_state["review_order_cache"] = cached = (key, order)
    return cached[1]


@st.cache_data(max_entries=16, show_spinner="Reading run results…")
def _run_table(root: str, run_id: str, what: str, stamp: tuple[float, ...]) -> Any:
    from datainf_core import runs
    from datainf_core.project import load_project

    project = load_project(root)
    loader = {
        "signals": runs.load_signals,
        "scores": runs.load_scores,
        "per_query": runs.load_per_query,
        "evaluation": runs.load_evaluation,
    }[what]
    return loader(project, run_id)


def run_table(project: Any, run_id: str, what: str) -> Any:
    """A run's ``signals`` / ``scores`` / ``per_query`` / ``evaluation`` (cached per run state)."""
    folder = Path(project.runs_dir) / run_id
    stamp = appstate.file_stamp(folder / "status.json", folder / f"{what}.parquet")
    try:
        return _run_table(str(project.root), run_id, what, stamp)
    except DataInfError as exc:
        st.error(str(exc))
        return None
    except FileNotFoundError:
        return None


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def _adapted_model(root: str, stamp: tuple[float, ...]) -> tuple[Any, Any]:
    from datainf_core import models
    from datainf_core.project import load_project

    project = load_project(root)
    model = models.load_adapted_model(project, device="auto", is_trainable=False)
    return model, models.load_tokenizer(project)


@st.cache_data(max_entries=4, show_spinner="Predicting labels with the model…")
def _predicted(root: str, stamp: tuple[float, ...]) -> pd.Series:
    from datainf_core.data import load_split
    from datainf_core.project import load_project

    project = load_project(root)
    model, tokenizer = _adapted_model(root, stamp)
    return appstate.predict_labels(project, model, tokenizer, load_split(project, "train"))


def predicted_labels(project: Any) -> pd.Series | None:
    """The adapted model's predicted label per train row (cached per adapter and data file)."""
    adapter = project.adapter_path
    if project.task != "classification" or adapter is None:
        return None
    stamp = appstate.file_stamp(
        project.train_path, project.project_file, Path(adapter) / "adapter_model.safetensors"
    )
    try:
        return _predicted(str(project.root), stamp)
    except DataInfError as exc:
        st.error(str(exc))
        return None


@st.cache_resource(show_spinner=False)
def device_text() -> str:
    """The compute device, e.g. ``CUDA: NVIDIA H200`` or ``CPU (2 threads)``."""
    from datainf_core.device import describe_device

    return describe_device("auto")


# ---- runs ----------------------------------------------------------------------------------------


def run_rows(project: Any) -> list[dict[str, Any]]:
    """Every run of the project as plain dicts (newest first)."""
    from datainf_core import runs

    try:
        infos = runs.list_runs(project)
    except DataInfError as exc:
        st.error(str(exc))
        return []
    rows = []
    for info in infos:
        row = dataclasses.asdict(info) if dataclasses.is_dataclass(info) else dict(vars(info))
        rows.append({k: str(v) if isinstance(v, Path) else v for k, v in row.items()})
    return rows


def finished_runs(project: Any) -> list[str]:
    """Ids of runs that finished (their results can be read), newest first."""
    return [str(r["run_id"]) for r in run_rows(project) if r.get("state") == "done"]


def pick_run(project: Any, *, key: str) -> str | None:
    """A select box of finished runs (the latest preselected); None with a hint if there is none."""
    done = finished_runs(project)
    if not done:
        st.info("No finished influence run yet. Start one on the **Run** page.")
        st.page_link("pages/run.py", label="Go to Run", icon=":material/play_arrow:")
        return None
    chosen = st.session_state.get("chosen_run")
    index = done.index(chosen) if chosen in done else 0
    run_id = st.selectbox("Run", done, index=index, key=key)
    st.session_state["chosen_run"] = run_id
    if project.task == "generation":
        settings_file = Path(project.runs_dir) / run_id / "settings.json"
        try:
            caption = appstate.loss_tokens_caption(json.loads(settings_file.read_text("utf-8")))
        except (OSError, ValueError):
            caption = None
        if caption:
            st.caption(caption)
    return run_id


def image_folder(split_path: Path) -> Path:
    """Where a split's relative image paths start: its imagefolder, or its table's folder."""
    return split_path if split_path.is_dir() else split_path.parent


def show_image(
    path: Any, *, caption: str | None = None, width: int = 160, base: Path | None = None
) -> None:
    """Shows an image file (a relative path is taken from ``base``), or a note if it cannot be read."""
    image = Path(str(path)).expanduser()
    if not image.is_absolute() and base is not None:
        image = base / image
    try:
        st.image(str(image), caption=caption, width=width)
    except Exception:  # a broken image must not break the page
        st.caption(f"(image {path} cannot be shown)")
