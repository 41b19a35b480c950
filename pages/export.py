"""Export: preview the cleaned set, summary of changes, download or save; the edit log."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from datainf_core import appstate, export
from datainf_core.errors import DataInfError
from datainf_core.review import ReviewStore
from pages.common import ensure_app_ran, finished_runs, load_split, require_project

ensure_app_ran()

st.title("Export")
project = require_project()
train_df = load_split(project, "train")
if train_df is None:
    st.stop()

c1, c2, c3 = st.columns(3)
drop = c1.checkbox("Drop excluded samples", value=True, key="export_drop")
relabel = c2.checkbox(
    "Write corrected labels into the label column", value=True, key="export_relabel"
)
runs_done = finished_runs(project)
run_id = c3.selectbox(
    "Scores from run", runs_done, key="export_run", help="Fills the score column (the combined signal)."
) if runs_done else None  # fmt: skip

try:
    frame = export.cleaned_frame(
        project, drop_excluded=drop, apply_relabels=relabel, run_id=run_id, train_df=train_df
    )
except DataInfError as exc:
    st.error(str(exc))
    st.stop()

summary = export.summarize_changes(frame, total=len(train_df))
m = st.columns(6)
m[0].metric("Train rows", f"{summary['train_rows']:,}")
m[1].metric("Exported rows", f"{summary['exported_rows']:,}")
m[2].metric("Dropped", summary["dropped"])
m[3].metric("Relabelled", summary["relabel"])
m[4].metric("Kept as is", summary["keep"])
m[5].metric("Needs review", summary["needs_review"])
if summary["needs_review"]:
    st.warning(
        f"{summary['needs_review']} samples are marked *needs review*; they are exported as they are."
    )

st.markdown("**Preview**")
only_changed = st.checkbox("Only reviewed samples", key="export_only_changed")
preview = frame[frame["action"].notna()] if only_changed else frame
page_size = 50
n_pages = max(1, -(-len(preview) // page_size))
page = st.number_input(f"Page (of {n_pages})", 1, n_pages, 1, key="export_page")
start, stop, page, n_pages = appstate.page_bounds(len(preview), page, page_size)
st.dataframe(preview.iloc[start:stop], width="stretch", height=320)

st.markdown("**Download or save**")
d1, d2 = st.columns(2)
with d1:
    fmt = st.radio("Format", list(export.FORMATS), horizontal=True, key="export_format")
    st.download_button(
        f"Download {fmt.upper()}",
        data=export.frame_to_bytes(frame, fmt),
        file_name=f"{Path(project.train_path).stem}_reviewed.{fmt}",
        key="export_download",
        type="primary",
    )
with d2:
    default = str(
        Path(project.root) / "exports" / f"{Path(project.train_path).stem}_reviewed.{fmt}"
    )
    target = st.text_input("Save to path", value=default, key=f"export_path_{fmt}")
    if st.button("Save", key="export_save"):
        try:
            written = export.export_dataset(
                project, target, fmt=fmt, drop_excluded=drop, apply_relabels=relabel, run_id=run_id
            )
        except DataInfError as exc:
            st.error(str(exc))
        else:
            st.success(f"Saved {summary['exported_rows']:,} rows to {written}")

st.divider()
st.markdown("**Edit log** (every decision, undo and redo, in order)")
log = ReviewStore(project.reviews_path).log()
if log.empty:
    st.caption("No decisions yet.")
else:
    st.dataframe(log.tail(500).iloc[::-1], hide_index=True, width="stretch", height=260)
    st.caption(f"{len(log):,} events; the newest 500 are shown.")
    st.download_button("Download the edit log (CSV)", data=export.frame_to_bytes(log, "csv"),
                       file_name="review_log.csv", key="export_log_download")  # fmt: skip
