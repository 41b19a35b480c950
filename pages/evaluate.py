"""Evaluate: detection per signal where the truth is known; agreement; retrain on the cleaned set."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from datainf_core import appstate
from datainf_core.errors import DataInfError
from pages.common import ensure_app_ran, load_split, pick_run, require_project, run_table

ensure_app_ran()

st.title("Evaluate")
project = require_project()
run_id = pick_run(project, key="evaluate_run")
train_df = load_split(project, "train")
if run_id is None or train_df is None:
    st.stop()

signals = run_table(project, run_id, "signals")
evaluation = run_table(project, run_id, "evaluation")
if evaluation is None and signals is not None and "is_noisy" in train_df.columns:
    from datainf_core.evaluate import evaluate_signals

    try:
        evaluation = evaluate_signals(signals, train_df)
    except (DataInfError, ValueError) as exc:
        st.error(f"Cannot evaluate this run: {exc}")

fit = (evaluation or {}).get("fit")
if fit:  # needs no truth: says which signals to expect to work
    from datainf_core.evaluate import fit_message

    (st.warning if fit.get("fits_training_better") else st.success)(fit_message(fit))

if not evaluation or "detection_auc" not in evaluation:
    st.info(
        "Detection needs the truth: an `is_noisy` column in the train file (the built-in demos have "
        "one). The agreement between signals is shown below when the run has several."
    )
else:
    st.markdown(
        f"**Mislabel detection** — {evaluation.get('noise_rate', 0):.0%} of the training labels "
        "are known to be wrong. A signal ranks samples most-suspicious first; the AUC is the chance "
        "that a random wrong label ranks above a random correct one (0.5 = guessing)."
    )
    aucs = pd.Series(evaluation["detection_auc"], name="AUC").sort_values(ascending=False)
    c1, c2 = st.columns([2, 3])
    with c1:
        st.dataframe(aucs.to_frame().style.format("{:.3f}"), width="stretch")
        best = evaluation.get("best_single")
        if best:
            st.caption(f"Best single signal: {best['signal']} ({best['auc']:.3f}).")
    with c2:
        fig = go.Figure()
        for name, curve in evaluation.get("detection_curve", {}).items():
            fig.add_trace(go.Scatter(x=curve["fraction_inspected"], y=curve["fraction_found"],
                                     mode="lines", name=f"{name} ({aucs.get(name, float('nan')):.3f})"))  # fmt: skip
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="random",
                                 line={"dash": "dot", "color": "grey"}))  # fmt: skip
        fig.update_layout(height=360, xaxis_title="share of training set inspected",
                          yaxis_title="share of wrong labels found", margin={"t": 20})  # fmt: skip
        st.plotly_chart(fig, key="evaluate_curves")

corr = (evaluation or {}).get("rank_correlation")
if corr:
    st.markdown("**Agreement between signals** (Spearman rank correlation)")
    c1, c2 = st.columns([3, 2])
    matrix = pd.DataFrame(corr)
    fig = px.imshow(matrix, text_auto=".2f", zmin=-1, zmax=1, color_continuous_scale="RdBu")
    fig.update_layout(height=360, margin={"t": 20})
    c1.plotly_chart(fig, key="evaluate_corr")
    c2.markdown(
        "1 = two signals rank the training samples in the same order, 0 = unrelated orders. "
        "Signals that agree little but each detect well carry independent evidence; signals that "
        "agree almost perfectly are one signal under two names."
    )
weights = (evaluation or {}).get("combined_weights")
if weights:
    st.markdown("**What the combined ranking averages** (the default order of the review queue)")
    c1, c2 = st.columns([2, 3])
    table = appstate.weights_table(weights, (evaluation or {}).get("detection_auc"))
    c1.dataframe(table.set_index("signal"), width="stretch")
    c2.markdown(appstate.WEIGHTS_EXPLANATION)
identification = (evaluation or {}).get("identification")
if identification:
    st.markdown("**Identification** (for each validation sample, are the most helpful training "
                "samples from its own category?)")  # fmt: skip
    st.dataframe(pd.DataFrame(identification).T, width="stretch")

# ---- retrain on the cleaned set ----------------------------------------------------------------
st.divider()
st.subheader("Retrain on the cleaned set")
st.markdown(
    "Fine-tunes a fresh adapter with the same settings on the training set after your review "
    "(excluded samples dropped, corrected labels applied), then compares validation loss and "
    "accuracy with the current adapter. Your project is not changed: the new adapter goes to "
    "`retrain/` inside the project folder."
)
status_path = appstate.retrain_status_path(project)
c1, c2, c3 = st.columns([1, 1, 1])
drop = c1.checkbox("Drop excluded samples", value=True, key="evaluate_drop")
relabel = c2.checkbox("Apply corrected labels", value=True, key="evaluate_relabel")
if c3.button("Retrain on the cleaned set", key="evaluate_retrain", type="primary"):
    if project.adapter_path is None:
        st.error("This project has no adapter to compare with; train one first (`datainf train`).")
    else:
        appstate.start_retrain(project, drop_excluded=drop, apply_relabels=relabel)
        st.rerun()


@st.fragment(run_every=1.0)
def retrain_progress() -> None:
    status = appstate.job_state(status_path)
    if status["state"] == "missing":
        st.caption("Not run yet.")
        return
    if status["state"] == "running":
        eta = appstate.format_seconds(appstate.estimate_eta(status))
        st.progress(appstate.progress_fraction(status),
                    text=f"{status['stage']}: {status['done']}/{status['total']} (ETA {eta})")  # fmt: skip
        return
    if status["state"] == "failed":
        st.error(f"Retraining failed: {status['error']}")
        return
    result = status.get("result") or {}
    before, after = result.get("before", {}), result.get("after", {})
    st.success(f"Retrained on {result.get('train_rows', '?')} samples in "
               f"{appstate.format_seconds(result.get('seconds'))}.")  # fmt: skip
    table = pd.DataFrame({"before (current adapter)": before, "after (cleaned set)": after}).rename(
        index={"val_loss": "validation loss", "val_accuracy": "validation accuracy"}
    )
    st.dataframe(table.style.format("{:.4f}", na_rep="–"), width="stretch")
    st.caption(f"New adapter: `{result.get('adapter_path')}`")


retrain_progress()
