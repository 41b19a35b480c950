"""Run: choose methods and settings, start an influence run in a worker, follow it, cancel it."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from datainf_core import appstate
from datainf_core.errors import DataInfError
from pages.common import ensure_app_ran, require_project, run_rows

ensure_app_ran()

st.title("Run influence")
project = require_project()

from datainf_core import runs  # noqa: E402  (after the project check: imports torch)
from datainf_core.influence import METHODS  # noqa: E402

if project.adapter_path is None:
    st.warning("This project has no adapter yet; train one (`datainf train`) before a run.")

METHOD_HELP = {
    "datainf": "DataInf: closed-form approximation of the inverse Hessian per adapter block (fast)",
    "exact": "exact inverse of the damped empirical Fisher per block (slow for wide blocks)",
    "lissa": "LiSSA: iterative inverse-Hessian-vector products",
    "hessian_free": "Hessian-free: plain gradient dot products (no inverse)",
}

with st.form("run_settings"):
    st.markdown("**Methods** (each gives one score per training sample)")
    chosen = []
    cols = st.columns(len(METHODS))
    for col, method in zip(cols, METHODS, strict=True):
        if col.checkbox(method, value=method in ("datainf", "hessian_free"), key=f"run_m_{method}",
                        help=METHOD_HELP.get(method)):  # fmt: skip
            chosen.append(method)
    c1, c2, c3 = st.columns(3)
    cosine = c1.checkbox(
        "Also unit-norm (cosine) variants",
        value=False,
        help="Normalises each gradient first, so a few samples with huge gradients do not dominate. "
        "The unit-norm DataInf and Hessian-free aggregate scores are computed in every run anyway: "
        "they feed the default combined ranking; this adds the others and their per-sample scores.",
        key="run_cosine",
    )
    per_query = c2.checkbox(
        "Keep scores per validation sample",
        value=True,
        help="Needed by the Explorer's per-sample view (one score per validation × training pair).",
        key="run_per_query",
    )
    damping = c3.number_input(
        "Damping λ", min_value=0.0, value=0.1, step=0.05, format="%.3f", key="run_damping"
    )
    d1, d2, d3 = st.columns(3)
    device = d1.selectbox("Device", ["auto", "cpu", "cuda", "mps"], key="run_device")
    self_influence = d2.checkbox("Self-influence signal", value=True, key="run_self")
    train_loss = d3.checkbox("Training-loss signal", value=True, key="run_loss")
    loss_tokens = None
    if project.task == "generation":
        loss_tokens = st.selectbox(
            "Loss on tokens",
            ["response", "prompt", "all"],
            index=["response", "prompt", "all"].index(project.influence.loss_tokens),
            key="run_loss_tokens",
            help="; ".join(f"{k}: {v}" for k, v in appstate.LOSS_TOKENS_MEANING.items()),
        )
    e1, e2, _ = st.columns(3)
    nproc = e1.number_input(
        "Processes", min_value=1, max_value=64, value=1, step=1, key="run_nproc",
        help="torch.distributed ranks for gradients and scores (one GPU each when there are "
        "GPUs); each rank loads the model, so this pays off only for large runs",
    )  # fmt: skip
    projection = e2.number_input(
        "Projected dimensions (0 = whole gradients)", min_value=0, value=0, step=1024,
        key="run_projection",
        help="Store each adapter block's gradients randomly projected to this many dimensions "
        "(e.g. 4096) when the gradient store would be too large; scores then approximate the "
        "unprojected ones",
    )  # fmt: skip
    start = st.form_submit_button("Start run", type="primary")

if start:
    methods = chosen + ([f"{m}_cosine" for m in chosen] if cosine else [])
    try:
        if not methods:
            raise DataInfError("no method selected; tick at least one method, e.g. datainf")
        settings = runs.RunSettings(
            methods=methods,
            per_query=per_query,
            damping=float(damping),
            device=device,
            loss_tokens=loss_tokens,
            self_influence=self_influence,
            train_loss=train_loss,
            nproc=int(nproc),
            projection_dim=int(projection) or None,
        )
        run_id = runs.start_run_process(project, settings)
    except DataInfError as exc:
        st.error(str(exc))
    else:
        st.session_state["run_active"] = run_id
        st.toast(f"Started run {run_id}")
        time.sleep(0.3)
        st.rerun()


@st.fragment(run_every=1.0)
def live_runs() -> None:
    rows = run_rows(project)
    active = [r for r in rows if r.get("state") in ("queued", "running", "starting")]
    if not active:
        if st.session_state.pop("run_was_active", False):
            st.rerun(scope="app")  # refresh the table of past runs once
        st.caption("No run in progress.")
        return
    st.session_state["run_was_active"] = True
    for row in active:
        run_id = str(row["run_id"])
        status = runs.read_status(project, run_id)
        fraction = appstate.progress_fraction(status)
        eta = status.get("eta")
        eta_text = appstate.format_seconds(float(eta)) if eta is not None else "–"
        c1, c2 = st.columns([5, 1])
        c1.progress(
            fraction,
            text=f"Run {run_id}: {status.get('stage') or 'starting'} — "
            f"{status.get('done', 0)}/{status.get('total', 0)}, ETA {eta_text}",
        )
        if c2.button("Cancel", key=f"run_cancel_{run_id}"):
            runs.cancel_run(project, run_id)
            st.rerun(scope="app")


st.subheader("In progress")
live_runs()

st.subheader("Past runs")
rows = run_rows(project)
if not rows:
    st.caption("No runs yet.")
else:
    records = []
    for row in rows:
        run_id = str(row["run_id"])
        timings = runs.load_timings(project, run_id)
        try:
            damping = runs.load_settings(project, run_id).damping
        except DataInfError:
            damping = None
        records.append(
            {
                "run": run_id,
                "state": row.get("state"),
                "created": str(row.get("created", ""))[:19].replace("T", " "),
                "methods": ", ".join(row.get("methods") or []),
                "per validation sample": bool(row.get("per_query")),
                "damping": damping,
                "time": appstate.format_seconds(sum(timings.values())) if timings else "–",
                "stages": ", ".join(
                    f"{k} {appstate.format_seconds(v)}" for k, v in timings.items()
                ),
            }
        )
    st.dataframe(pd.DataFrame(records), hide_index=True, width="stretch")
    failed = [r for r in rows if r.get("state") == "failed"]
    for row in failed[:3]:
        status = runs.read_status(project, str(row["run_id"]))
        st.error(f"Run {row['run_id']} failed: {status.get('error') or 'unknown error'}")
