"""Mislabel review: a ranked queue, per-sample and bulk decisions, shortcuts, undo/redo."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from datainf_core import appstate
from datainf_core.errors import DataInfError
from datainf_core.review import ReviewStore
from pages.common import (
    ensure_app_ran,
    finished_runs,
    image_folder,
    load_split,
    predicted_labels,
    require_project,
    review_order,
    run_table,
    show_image,
)

ensure_app_ran()

st.title("Review suspected mislabels")
project = require_project()
train_df = load_split(project, "train")
if train_df is None:
    st.stop()
store = ReviewStore(project.reviews_path)
label_col = project.data.label_column if project.task == "classification" else None
labels = project.data.labels if label_col else None
content = appstate.text_columns(project)
image_base = image_folder(project.train_path)

# ---- ranking signal --------------------------------------------------------------------------
runs_done = finished_runs(project)
signals = None
top = st.columns([2, 2, 3])
if runs_done:
    run_id = top[0].selectbox("Run", runs_done, key="review_run")
    signals = run_table(project, run_id, "signals")
else:
    top[0].info("No finished run: the queue is in file order. Start a run to rank it.")
signal_names = [c for c in (signals.columns if signals is not None else []) if c != "train_index"]
signal_names = [c for c in signal_names if np.issubdtype(signals[c].dtype, np.number)]
signal = None
if signal_names:
    default = appstate.default_signal(signal_names)
    signal = top[1].selectbox(
        "Rank by", signal_names, index=signal_names.index(default), key="review_signal",
        help="Higher = more suspicious. " + "; ".join(f"{k}: {v}" for k, v in appstate.SIGNAL_HELP.items()),
    )  # fmt: skip
predicted = None
if signals is not None and "predicted_label" in signals.columns:
    predicted = signals.set_index("train_index")["predicted_label"]
elif labels and len(labels) > 2:
    # Several classes: pre-fill relabels with the model's prediction (binary: the other label).
    predicted = predicted_labels(project)

order_table = review_order(project, run_id if runs_done else None, signal, signals, predicted)
queue = appstate.with_decisions(order_table, store.actions())

# ---- progress counts ---------------------------------------------------------------------------
counts = store.counts()
top[2].progress(
    counts["reviewed"] / max(len(train_df), 1),
    text=f"Reviewed {counts['reviewed']:,} of {len(train_df):,}",
)
top[2].caption(
    " · ".join(f"{appstate.STATUS_NAMES[a]}: **{counts[a]:,}**" for a in appstate.STATUSES[1:])
)

# ---- histogram, threshold and filters (left column, above the queue) ----------------------------
left, right = st.columns([3, 2], gap="large")
threshold = None
values = queue["suspicion"].dropna()
with left.expander("Distribution, threshold and filters", expanded=True):
    if len(values):
        lo, hi = float(values.min()), float(values.max())
        h1, h2 = st.columns([1, 2])
        use_threshold = h1.checkbox("Apply threshold", key="review_use_threshold")
        threshold_value = lo
        if hi > lo:
            threshold_value = h2.slider(
                f"Threshold on {signal}", lo, hi, float(np.quantile(values, 0.8)),
                key="review_threshold", disabled=not use_threshold, label_visibility="collapsed",
            )  # fmt: skip
        threshold = threshold_value if use_threshold else None
        # Binned here: 60 bars go to the browser, not one point per training sample.
        counts_per_bin, edges = np.histogram(values.to_numpy(), bins=60)
        fig = go.Figure(
            go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts_per_bin, width=np.diff(edges),
                   marker_color="#5c7cfa")
        )  # fmt: skip
        fig.add_vline(x=threshold_value, line_color="#e8590c", line_dash="dash")
        fig.update_layout(height=170, margin={"t": 5, "b": 5, "l": 5, "r": 5},
                          xaxis_title=None, yaxis_title="samples")  # fmt: skip
        st.plotly_chart(fig, key="review_histogram")
    f = st.columns(4)
    class_filter = (
        f[0].multiselect("Given label", labels or [], key="review_filter_labels") if labels else []
    )
    status_filter = f[1].multiselect(
        "Status", list(appstate.STATUSES), format_func=appstate.STATUS_NAMES.get,
        key="review_filter_status",
    )  # fmt: skip
    search = f[2].text_input("Search text", key="review_search")
    page_size = f[3].selectbox("Rows per page", [25, 50, 100, 200], key="review_page_size")

shown = appstate.filter_queue(
    queue, labels=class_filter, statuses=status_filter, threshold=threshold, search=search
)
order = shown["train_index"].tolist()


def _first_action_since_render() -> bool:
    """True once per fully rendered page: later calls are replays, and are ignored.

    A rerun that races a click (a second key press before the page is back, or a rerun from
    elsewhere) can replay the click's trigger with the arguments already registered for the
    *next* sample. Acting only on the page the user last saw whole keeps one click one decision.
    """
    if st.session_state.get("review_acted"):
        return False
    st.session_state["review_acted"] = True
    return True


def decide(indices: list[int], action: str, corrected: str | None = None) -> None:
    """Records a decision; on the current sample, moves to the next one in the queue."""
    if not _first_action_since_render():
        return
    try:
        store.record(indices, action, corrected_label=corrected)
    except DataInfError as exc:
        st.session_state["review_error"] = str(exc)
        return
    current = st.session_state.get("review_cursor")
    if len(indices) == 1 and indices[0] == current:
        st.session_state["review_cursor"] = appstate.next_after_decision(order, current)
    st.session_state["review_table_version"] = st.session_state.get("review_table_version", 0) + 1


def move(step: int) -> None:
    if not _first_action_since_render():
        return
    st.session_state["review_cursor"] = appstate.step_cursor(
        order, st.session_state.get("review_cursor"), step
    )


def undo() -> None:
    if not _first_action_since_render():
        return
    if store.undo() is None:
        st.session_state["review_error"] = "Nothing to undo."


def redo() -> None:
    if not _first_action_since_render():
        return
    if store.redo() is None:
        st.session_state["review_error"] = "Nothing to redo."


if st.session_state.get("review_error"):
    st.warning(st.session_state.pop("review_error"))

# ---- the queue (paged) with bulk actions -------------------------------------------------------
with left:
    st.markdown(f"**Queue** — {len(shown):,} of {len(queue):,} samples")
    n_pages = max(1, -(-len(shown) // page_size))
    page = st.number_input(f"Page (of {n_pages})", 1, n_pages, 1, key="review_page")
    start, stop, page, n_pages = appstate.page_bounds(len(shown), page, page_size)
    page_df = shown.iloc[start:stop]
    view = page_df[["train_index", "preview", "suspicion", "label", "status", "corrected_label"]]
    version = st.session_state.get("review_table_version", 0)
    picked = st.dataframe(
        view, hide_index=True, on_select="rerun", selection_mode="multi-row", height=420,
        key=f"review_table_{version}_{page}", width="stretch",
        column_config={
            "train_index": st.column_config.NumberColumn("#", width="small"),
            "suspicion": st.column_config.NumberColumn(signal or "score", format="%.3f", width="small"),
            "label": st.column_config.TextColumn(width="small"),
            "status": st.column_config.TextColumn(width="medium"),
            "corrected_label": st.column_config.TextColumn("new label", width="small"),
            "preview": st.column_config.TextColumn("sample", width="medium"),
        },
    )  # fmt: skip
    selection = appstate.selected_indices(page_df, picked.selection.rows if picked else [])
    if len(selection) == 1:
        st.session_state["review_cursor"] = selection[0]
    b = st.columns([2, 2, 2])
    b[0].markdown(f"**{len(selection)} selected** (tick rows for bulk actions)")
    disabled = not selection
    if labels:
        bulk_label = b[1].selectbox(
            "Relabel to", labels, key="review_bulk_label", label_visibility="collapsed"
        )
        b[2].button("Relabel selected", key="review_bulk_relabel", disabled=disabled,
                    on_click=decide, args=(selection, "relabel", bulk_label), width="stretch")  # fmt: skip
    c = st.columns(3)
    c[0].button("Keep selected", key="review_bulk_keep", disabled=disabled,
                on_click=decide, args=(selection, "keep"), width="stretch")  # fmt: skip
    c[1].button("Exclude selected", key="review_bulk_exclude", disabled=disabled,
                on_click=decide, args=(selection, "exclude"), width="stretch")  # fmt: skip
    c[2].button("Needs review (selected)", key="review_bulk_needs", disabled=disabled,
                on_click=decide, args=(selection, "needs_review"), width="stretch")  # fmt: skip

# ---- the current sample ------------------------------------------------------------------------
with right:
    cursor = st.session_state.get("review_cursor")
    if cursor is None or cursor not in set(order):
        cursor = order[0] if order else None
        st.session_state["review_cursor"] = cursor
    if cursor is None:
        st.info("No sample matches the filters.")
    else:
        row = queue.set_index("train_index").loc[cursor]
        position = order.index(cursor) + 1
        with st.container(border=True):
            st.markdown(
                f"**Training sample #{cursor}** · {position:,} of {len(order):,} in the queue"
            )
            details = f"Status: **{appstate.STATUS_NAMES[row['status']]}**"
            if row["status"] == "relabel":
                details += f" → {row['corrected_label']}"
            if not np.isnan(row["suspicion"]):
                details += f" · {signal} `{row['suspicion']:.4g}`"
            st.markdown(details)
            sample = train_df.iloc[cursor]
            if project.task == "text-to-image":
                show_image(sample[project.data.image_column], width=200, base=image_base)
            for column in content:
                st.markdown(f"<small>{column}</small><br>{sample[column]}", unsafe_allow_html=True)
            if label_col:
                st.markdown(f"Given label: **{row['label']}**")
        relabel_to = None
        if labels:
            suggested = row["suggested"] if row["suggested"] in labels else labels[0]
            relabel_to = st.selectbox(
                "Relabel to",
                labels,
                index=labels.index(suggested),
                key=f"review_relabel_to_{cursor}",
            )
        a = st.columns(2)
        a[0].button("Keep (K)", key="review_keep", icon=":material/check:", width="stretch",
                    on_click=decide, args=([cursor], "keep"))  # fmt: skip
        a[1].button("Exclude (X)", key="review_exclude", icon=":material/block:", width="stretch",
                    on_click=decide, args=([cursor], "exclude"))  # fmt: skip
        a[0].button("Relabel (L)", key="review_relabel",
                    icon=":material/edit:", width="stretch", disabled=not labels,
                    on_click=decide, args=([cursor], "relabel", relabel_to))  # fmt: skip
        a[1].button("Needs review (Q)", key="review_needs_review", icon=":material/flag:",
                    width="stretch", on_click=decide, args=([cursor], "needs_review"))  # fmt: skip
        n = st.columns(2)
        n[0].button("Previous (P)", key="review_previous", icon=":material/arrow_back:",
                    width="stretch", on_click=move, args=(-1,))  # fmt: skip
        n[1].button("Next (N)", key="review_next", icon=":material/arrow_forward:",
                    width="stretch", on_click=move, args=(1,))  # fmt: skip
        n[0].button("Undo (U)", key="review_undo", icon=":material/undo:", width="stretch", on_click=undo,
                    disabled=not store.can_undo())  # fmt: skip
        n[1].button("Redo (Y)", key="review_redo", icon=":material/redo:", width="stretch", on_click=redo,
                    disabled=not store.can_redo())  # fmt: skip
    with st.expander("Keyboard shortcuts"):
        st.markdown(
            "\n".join(f"- **{k.upper()}**: {v}" for k, v in appstate.REVIEW_KEY_HELP.items())
            + "\n\nShortcuts act on the sample shown here; they are ignored while typing in a field."
        )

st.iframe(appstate.shortcut_script(appstate.REVIEW_KEYS), height=1)
st.session_state["review_acted"] = False  # the page is whole: the next click counts
