"""Influence explorer: a validation sample, its most helpful and most harmful training samples."""

from __future__ import annotations

import html

import pandas as pd
import plotly.express as px
import streamlit as st

from datainf_core import appstate
from datainf_core.review import ReviewStore
from pages.common import (
    ensure_app_ran,
    image_folder,
    load_split,
    pick_run,
    require_project,
    run_table,
    show_image,
)

ensure_app_ran()

st.title("Influence explorer")
project = require_project()
st.info(appstate.SIGN_EXPLANATION, icon=":material/info:")

top = st.columns([2, 2, 2])
with top[0]:
    run_id = pick_run(project, key="explorer_run")
if run_id is None:
    st.stop()
train_df = load_split(project, "train")
val_df = load_split(project, "validation")
if train_df is None or val_df is None:
    st.stop()
per_query = run_table(project, run_id, "per_query")
scores = run_table(project, run_id, "scores")
methods = appstate.method_names(per_query) or appstate.method_names(scores)
if not methods:
    st.warning("This run has no influence scores.")
    st.stop()
method = top[1].selectbox("Method", methods, key="explorer_method")
k = top[2].slider("How many of each", 3, 20, 5, key="explorer_k")
label_col = project.data.label_column if project.task == "classification" else None
content = appstate.text_columns(project)
image_base = {
    "train": image_folder(project.train_path),
    "validation": image_folder(project.validation_path),
}
decided = ReviewStore(project.reviews_path).current().set_index("train_index")
image_col = project.data.image_column if project.task == "text-to-image" else None


def sample_card(
    df: pd.DataFrame, index: int, *, score: float | None = None, title: str = "train"
) -> None:
    """One sample: id, label, score, then its text (prompt and response) or image."""
    row = df.iloc[index]
    with st.container(border=True):
        head = f"**{title} #{index}**"
        if label_col:
            head += f" · label **{row[label_col]}**"
        if score is not None:
            colour = "red" if score > 0 else "green"
            head += f" · :{colour}[score **{appstate.format_score(score)}**]"
        if title == "train" and index in decided.index:
            action = decided.loc[index, "action"]
            head += f" · :blue-badge[{appstate.STATUS_NAMES.get(action, action)}]"
        st.markdown(head)
        if image_col:
            show_image(
                row[image_col],
                width=120,
                base=image_base["train" if title == "train" else "validation"],
            )
        for column in content:
            prefix = (
                f"<small style='color:grey'>{html.escape(column)}</small> "
                if len(content) > 1
                else ""
            )
            st.markdown(f"{prefix}{html.escape(str(row[column]))}", unsafe_allow_html=True)


def side_by_side(helpful: pd.DataFrame, harmful: pd.DataFrame, what: str) -> None:
    left, right = st.columns(2)
    with left:
        st.markdown(f"#### Most helpful {what} (negative)")
        for r in helpful.itertuples():
            sample_card(train_df, int(r.train_index), score=float(r.score))
    with right:
        st.markdown(f"#### Most harmful {what} (positive)")
        for r in harmful.itertuples():
            sample_card(train_df, int(r.train_index), score=float(r.score))


single_tab, all_tab = st.tabs(["One validation sample", "Whole validation set"])

with single_tab:
    if per_query is None or per_query.empty:
        st.info(
            "This run kept no per-sample scores. Start a run with *Keep scores per validation "
            "sample* ticked to use this view."
        )
    else:
        pick, show = st.columns([2, 3], gap="large")
        with pick:
            text = st.text_input("Search validation samples", key="explorer_search")
            wanted = []
            if label_col:
                wanted = st.multiselect("Label", project.data.labels or [], key="explorer_labels")
            found = appstate.search_rows(
                val_df, text=text, columns=content, label_column=label_col, labels=wanted
            )
            page_size = 10
            n_pages = max(1, -(-len(found) // page_size))
            page = st.number_input(f"Page (of {n_pages})", 1, n_pages, 1, key="explorer_page")
            start, stop, page, n_pages = appstate.page_bounds(len(found), page, page_size)
            shown = found.iloc[start:stop]
            table = shown[[c for c in [*content, label_col] if c]].copy()
            table.insert(0, "#", shown.index)
            picked = st.dataframe(
                table, hide_index=True, on_select="rerun", selection_mode="single-row",
                key=f"explorer_pick_{page}", width="stretch",
                column_config={"#": st.column_config.NumberColumn(width="small")},
            )  # fmt: skip
            st.caption(f"{len(found):,} of {len(val_df):,} validation samples; click a row.")
        if found.empty:
            show.warning("No validation sample matches the search.")
        else:
            rows = picked.selection.rows if picked is not None else []
            query = int(shown.index[rows[0]]) if rows else int(shown.index[0])
            with show:
                sample_card(val_df, query, title="Validation sample")
                these = per_query[
                    (per_query["query_index"] == query) & (per_query["method"] == method)
                ]
                fig = px.histogram(these, x="score", nbins=60)
                fig.add_vline(x=0, line_dash="dot")
                fig.update_layout(
                    height=260, margin={"t": 30, "b": 10}, yaxis_title="training samples",
                    title=f"{method} scores of every training sample on #{query}",
                )  # fmt: skip
                st.plotly_chart(fig, key="explorer_hist_single")
            helpful, harmful = appstate.top_influences(
                per_query, query_index=query, method=method, k=k
            )
            side_by_side(helpful, harmful, "training samples")

with all_tab:
    if scores is None or scores.empty:
        st.info("This run has no aggregate scores.")
    else:
        agg = scores[scores["method"] == method][["train_index", "score"]]
        st.markdown(
            "Each training sample's score summed over the whole validation set: positive = it "
            "raises the validation loss overall (suspicious), negative = it lowers it."
        )
        if label_col:
            agg = agg.assign(label=train_df[label_col].iloc[agg["train_index"]].to_numpy())
        fig = px.histogram(agg, x="score", color="label" if label_col else None, nbins=80,
                           barmode="overlay", title=f"Aggregate {method} scores")  # fmt: skip
        fig.add_vline(x=0, line_dash="dot")
        fig.update_layout(height=300, margin={"t": 40, "b": 10})
        st.plotly_chart(fig, key="explorer_hist_all")
        side_by_side(agg.nsmallest(k, "score"), agg.nlargest(k, "score"), "overall")
