"""Projects: open a folder, create a project, or start a built-in demo; shows what is open."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from datainf_core import appstate
from datainf_core.errors import DataInfError
from pages.common import (
    PROJECT_KEY,
    current_project,
    device_text,
    ensure_app_ran,
    load_split,
    open_project,
)

ensure_app_ran()

st.title("Projects")


# ---- a demo being built --------------------------------------------------------------------


@st.fragment(run_every=1.0)
def demo_progress(kind: str) -> None:
    status = appstate.job_state(appstate.demo_status_path(kind))
    if appstate.demo_is_built(kind):
        st.session_state.pop("pending_demo", None)
        st.session_state[PROJECT_KEY] = str(appstate.demo_root(kind))
        st.rerun(scope="app")
    if status["state"] == "failed":
        st.error(f"Building the {kind} demo failed: {status['error']}")
        if st.button("Try again", key="demo_retry"):
            appstate.start_demo_build(kind)
            st.rerun(scope="app")
        return
    if status["state"] == "missing":
        appstate.start_demo_build(kind)
    stage = status.get("stage") or "starting"
    eta = appstate.format_seconds(appstate.estimate_eta(status))
    st.progress(
        appstate.progress_fraction(status),
        text=f"Building the {kind} demo: {stage} ({status['done']}/{status['total']}, ETA {eta})",
    )
    st.caption(
        "The demo is built once (data, then a LoRA fine-tune) in a background process; you can "
        "leave or reload this page."
    )


pending = st.session_state.get("pending_demo")
if pending:
    st.subheader(f"Preparing the {pending} demo")
    demo_progress(pending)


# ---- the open project ------------------------------------------------------------------------

project = current_project()
if project is not None:
    st.subheader(f"Open: {project.name}")
    cols = st.columns(4)
    cols[0].metric("Task", project.task)
    train_df = load_split(project, "train")
    val_df = load_split(project, "validation")
    cols[1].metric("Train samples", "–" if train_df is None else f"{len(train_df):,}")
    cols[2].metric("Validation samples", "–" if val_df is None else f"{len(val_df):,}")
    device_slot = cols[3].empty()  # filled last: the first call imports torch
    info = {
        "Folder": str(project.root),
        "Base model": project.model.base
        + (f" ({project.model.gguf_file})" if project.model.gguf_file else ""),
        "Adapter": str(project.adapter_path) if project.adapter_path else "none yet",
        "Train file": f"{project.train_path} ({appstate.data_size(project.train_path)})",
        "Validation file": f"{project.validation_path} "
        f"({appstate.data_size(project.validation_path)})",
        "Labels": ", ".join(project.data.labels or []) or "–",
    }
    st.markdown("\n".join(f"- **{key}**: `{value}`" for key, value in info.items()))
    if project.adapter_path is None:
        st.warning(
            "This project has no adapter yet: train one with `datainf train` before running "
            "influence."
        )
elif not pending:
    st.info("No project is open. Open a folder, create a project, or start a built-in demo below.")

# ---- open / create / demo ----------------------------------------------------------------------

open_tab, create_tab, demo_tab = st.tabs(["Open a folder", "Create a project", "Built-in demos"])

with open_tab:
    folder = st.text_input(
        "Project folder (holds project.toml)",
        key="projects_open_path",
        placeholder="/path/to/project",
    )
    clicked = st.button("Open", key="projects_open", type="primary")
    if clicked and folder.strip() and open_project(folder.strip()):
        st.rerun()


def _save_upload(upload, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / Path(upload.name).name
    target.write_bytes(upload.getvalue())
    return target


with create_tab, st.form("projects_create"):
    st.caption("Paths may be absolute or relative to the project folder.")
    c1, c2 = st.columns(2)
    root = c1.text_input("Project folder (created)", key="create_root")
    name = c2.text_input("Name (optional)", key="create_name")
    task = c1.selectbox(
        "Task", ["classification", "generation", "text-to-image"], key="create_task"
    )
    base = c2.text_input("Base model (folder or hub id)", key="create_base")
    adapter = c1.text_input("LoRA adapter folder (optional)", key="create_adapter")
    gguf = c2.text_input("GGUF file inside the base folder (optional)", key="create_gguf")
    train_path = c1.text_input("Train file (or upload below)", key="create_train")
    val_path = c2.text_input("Validation file (or upload below)", key="create_val")
    train_up = c1.file_uploader(
        "Upload train file", type=["csv", "jsonl", "parquet"], key="create_train_up"
    )
    val_up = c2.file_uploader(
        "Upload validation file", type=["csv", "jsonl", "parquet"], key="create_val_up"
    )
    st.caption(
        "Columns: classification reads `text`/`label`, generation `prompt`/`response`, "
        "text-to-image `image`/`caption` unless you name others."
    )
    k1, k2, k3 = st.columns(3)
    first_col = k1.text_input("Text / prompt / image column (optional)", key="create_col1")
    second_col = k2.text_input("Label / response / caption column (optional)", key="create_col2")
    labels = k3.text_input("Labels, comma separated (optional)", key="create_labels")
    submitted = st.form_submit_button("Create project", type="primary")

if submitted:
    from datainf_core.project import create_project

    try:
        if not root.strip() or not base.strip():
            raise DataInfError("a project needs a folder and a base model; fill in both fields")
        folder = Path(root.strip()).expanduser()
        train_file = _save_upload(train_up, folder / "data") if train_up else train_path.strip()
        val_file = _save_upload(val_up, folder / "data") if val_up else val_path.strip()
        if not train_file or not val_file:
            raise DataInfError(
                "a project needs a train and a validation file; give paths or upload"
            )
        columns = {
            "classification": ("text_column", "label_column"),
            "generation": ("prompt_column", "response_column"),
            "text-to-image": ("image_column", "caption_column"),
        }[task]
        settings = {}
        for setting, value in zip(columns, (first_col, second_col), strict=True):
            if value.strip():
                settings[setting] = value.strip()
        if labels.strip():
            settings["labels"] = [x.strip() for x in labels.split(",") if x.strip()]
        if gguf.strip():
            settings["gguf_file"] = gguf.strip()
        created = create_project(
            folder,
            name=name.strip() or None,
            task=task,
            base=base.strip(),
            adapter=adapter.strip() or None,
            train=train_file,
            validation=val_file,
            **settings,
        )
    except DataInfError as exc:
        st.error(str(exc))
    else:
        open_project(created.root)
        st.success(f"Created {created.name} in {created.root}")
        st.rerun()

with demo_tab:
    st.markdown(
        "Built-in demos run offline. The first start builds the data and fine-tunes the adapter "
        "(a few minutes on a CPU), in the background."
    )
    descriptions = {
        "text": "Sentiment of generated reviews on all-MiniLM-L6-v2, 20% of labels flipped.",
        "generation": "Sentence transformations on SmolLM2-135M (prompt/response).",
        "image": "Text-to-image: a small UNet with LoRA on digit images.",
    }
    for kind in appstate.DEMO_KINDS:
        c1, c2 = st.columns([3, 1])
        built = appstate.demo_is_built(kind)
        c1.markdown(f"**{kind}** — {descriptions[kind]} {'(built)' if built else ''}")
        if c2.button("Open" if built else "Build and open", key=f"projects_demo_{kind}"):
            if built:
                open_project(appstate.demo_root(kind))
            else:
                try:
                    appstate.start_demo_build(kind)
                except DataInfError as exc:
                    st.error(str(exc))
                else:
                    st.session_state["pending_demo"] = kind
            st.rerun()

if project is not None:
    device_slot.markdown(f"Device  \n**{device_text()}**")
