"""DataInf Studio: open a project, run influence, explore, review suspected mislabels, export.

Start with ``scripts/app`` (opens the built-in text demo) or
``.venv/bin/streamlit run app.py`` (set ``DATAINF_PROJECT=<folder>`` to open a project).
"""

from __future__ import annotations

import logging
import os

import streamlit as st

from pages.common import PROJECT_KEY, current_project, init_session

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("datainf_core").setLevel(logging.INFO)

st.set_page_config(page_title="DataInf Studio", page_icon=":material/insights:", layout="wide")
init_session()

pages = [
    st.Page("pages/projects.py", title="Projects", icon=":material/folder_open:", default=True),
    st.Page("pages/run.py", title="Run", icon=":material/play_arrow:"),
    st.Page("pages/explorer.py", title="Explorer", icon=":material/travel_explore:"),
    st.Page("pages/review.py", title="Review", icon=":material/rule:"),
    st.Page("pages/evaluate.py", title="Evaluate", icon=":material/monitoring:"),
    st.Page("pages/export.py", title="Export", icon=":material/download:"),
]
navigation = st.navigation(pages)

with st.sidebar:
    st.markdown("### DataInf Studio")
    if st.session_state.get("startup_error"):
        st.error(st.session_state["startup_error"])
    project = current_project() if st.session_state.get(PROJECT_KEY) else None
    if project is not None:
        st.markdown(f"**{project.name}**  \n{project.task}")
        st.caption(f"`{project.root}`")
    elif st.session_state.get("pending_demo"):
        st.caption(f"Building the {st.session_state['pending_demo']} demo…")
    else:
        st.caption("No project open")

navigation.run()
