"""The Streamlit app: appstate helpers (plain functions) and every page through AppTest."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures import make_tiny_classification_project, make_tiny_generation_project
from streamlit.testing.v1 import AppTest

from datainf_core import appstate, evaluate, runs
from datainf_core.review import ReviewStore

APP = str(Path(__file__).resolve().parent.parent / "app.py")
PAGES = [
    "pages/projects.py",
    "pages/run.py",
    "pages/explorer.py",
    "pages/review.py",
    "pages/evaluate.py",
    "pages/export.py",
]
TIMEOUT = 90


# ---- plain helpers -------------------------------------------------------------------------


def test_initial_target():
    assert appstate.initial_target({}) is None
    assert appstate.initial_target({"DATAINF_OPEN_DEMO": "text"}) == ("demo", "text")
    both = {"DATAINF_OPEN_DEMO": "text", "DATAINF_PROJECT": "/x/p"}
    assert appstate.initial_target(both) == ("project", "/x/p")
    with pytest.raises(appstate.AppError, match="is not a demo") as info:
        appstate.initial_target({"DATAINF_OPEN_DEMO": "movies"})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("n", "page", "size", "expected"),
    [
        (0, 1, 10, (0, 0, 1, 1)),
        (25, 1, 10, (0, 10, 1, 3)),
        (25, 3, 10, (20, 25, 3, 3)),
        (25, 9, 10, (20, 25, 3, 3)),
        (25, 0, 10, (0, 10, 1, 3)),
    ],
)
def test_page_bounds(n, page, size, expected):
    assert appstate.page_bounds(n, page, size) == expected


def test_suggest_label():
    labels = ["negative", "positive"]
    assert appstate.suggest_label("negative", labels) == "positive"
    assert appstate.suggest_label("positive", labels, predicted="positive") == "negative"
    three = ["a", "b", "c"]
    assert appstate.suggest_label("a", three, predicted="c") == "c"
    assert appstate.suggest_label("a", three, predicted=float("nan")) == "b"
    assert appstate.suggest_label(1.0, ["0", "1"]) == "0"
    assert appstate.suggest_label("a", None) is None


def _queue_inputs():
    train = pd.DataFrame(
        {
            "text": ["good film", "bad film", "fine plot", "awful plot"],
            "label": ["p", "n", "p", "n"],
        }
    )
    signals = pd.DataFrame(
        {
            "train_index": [0, 1, 2, 3],
            "combined": [0.1, 0.9, 0.5, np.nan],
            "train_loss": [3, 2, 1, 0],
        }
    )
    decisions = pd.DataFrame(
        {
            "train_index": [2, 7],
            "action": ["relabel", "exclude"],
            "corrected_label": ["n", None],
            "note": ["", ""],
            "reviewed_at": ["t", "t"],
        }
    )
    return train, signals, decisions


def test_build_and_filter_queue():
    train, signals, decisions = _queue_inputs()
    queue = appstate.build_queue(
        train, signals, decisions, signal="combined", label_column="label",
        content_columns=["text"], labels=["n", "p"],
    )  # fmt: skip
    # Most suspicious first; NaN last; an out-of-range decision (7) ignored.
    assert queue["train_index"].tolist() == [1, 2, 0, 3]
    assert queue["rank"].tolist() == [1, 2, 3, 4]
    assert queue.set_index("train_index").loc[2, "status"] == "relabel"
    assert queue.set_index("train_index").loc[2, "corrected_label"] == "n"
    assert queue.set_index("train_index").loc[1, "suggested"] == "p"
    by_loss = appstate.build_queue(train, signals, decisions, signal="train_loss")
    assert by_loss["train_index"].tolist() == [0, 1, 2, 3]
    assert appstate.filter_queue(queue, labels=["n"])["train_index"].tolist() == [1, 3]
    assert appstate.filter_queue(queue, statuses=["unreviewed"])["train_index"].tolist() == [
        1,
        0,
        3,
    ]
    assert appstate.filter_queue(queue, threshold=0.5)["train_index"].tolist() == [1, 2]
    assert appstate.filter_queue(queue, search="PLOT")["train_index"].tolist() == [2, 3]
    with pytest.raises(appstate.AppError, match="unknown review status"):
        appstate.filter_queue(queue, statuses=["deleted"])
    plain = appstate.build_queue(train, None, decisions.iloc[:0], signal=None)
    assert plain["train_index"].tolist() == [0, 1, 2, 3]


def test_queue_overlay_matches_a_plain_loop():
    """The cached order plus the decisions overlay equals a row-by-row reference."""
    rng = np.random.default_rng()
    n = 300
    labels = ["a", "b", "c"]
    train = pd.DataFrame(
        {"text": [f"t{i}" for i in range(n)], "label": rng.choice(labels, n).tolist()}
    )
    score = rng.standard_normal(n)
    score[rng.random(n) < 0.1] = np.nan
    signals = pd.DataFrame({"train_index": rng.permutation(n), "s": 0.0})
    signals["s"] = score[signals["train_index"]]
    picked = rng.choice(n, 80, replace=False)
    decisions = pd.DataFrame(
        {
            "train_index": picked,
            "action": rng.choice(["keep", "relabel", "exclude"], 80).tolist(),
            "corrected_label": rng.choice(labels, 80).tolist(),
        }
    )
    queue = appstate.build_queue(
        train, signals, decisions, signal="s", label_column="label", content_columns=["text"],
        labels=labels,
    )  # fmt: skip
    keyed = sorted(range(n), key=lambda i: (np.isnan(score[i]), -np.nan_to_num(score[i]), i))
    assert queue["train_index"].tolist() == keyed
    decided = {int(i): (a, c) for i, a, c in decisions.itertuples(index=False)}
    for row in queue.itertuples():
        action, corrected = decided.get(row.train_index, ("unreviewed", None))
        assert (row.status, row.corrected_label) == (action, corrected)
        assert row.label == train["label"][row.train_index]
        assert row.suggested == appstate.suggest_label(row.label, labels)


def test_weights_table_orders_signals_and_adds_measured_auc():
    table = appstate.weights_table(
        {"train_loss": 0.3, "datainf": 0.5, "lissa": 0.2}, {"train_loss": 0.7, "datainf": 0.3}
    )
    assert table["signal"].tolist() == ["datainf", "train_loss", "lissa"]
    assert table["weight"].tolist() == [0.5, 0.3, 0.2]
    assert table["measured AUC"].iloc[:2].tolist() == [0.3, 0.7]
    assert np.isnan(table["measured AUC"].iloc[2])
    assert list(appstate.weights_table({"a": 0.5, "b": 0.5}).columns) == ["signal", "weight"]


def test_fit_message_says_which_signals_to_expect():
    memorised = {"train_loss_mean": 0.1, "validation_loss_mean": 0.4, "ratio": 0.25,
                 "fits_training_better": True}  # fmt: skip
    assert "ratio 0.25" in evaluate.fit_message(memorised)
    assert "memorised" in evaluate.fit_message(memorised)
    held = {**memorised, "ratio": 1.8, "fits_training_better": False}
    assert "does not fit" in evaluate.fit_message(held)


def test_cursor_and_selection():
    order = [5, 3, 9]
    assert appstate.step_cursor(order, 3, 1) == 9
    assert appstate.step_cursor(order, 9, 1) == 9
    assert appstate.step_cursor(order, 5, -1) == 5
    assert appstate.step_cursor(order, 42, 1) == 5
    assert appstate.step_cursor([], 1, 1) is None
    assert appstate.next_after_decision(order, 3) == 9
    assert appstate.next_after_decision(order, 9) == 3
    assert appstate.next_after_decision([4], 4) is None
    page = pd.DataFrame({"train_index": [11, 12, 13]})
    assert appstate.selected_indices(page, [2, 0, 7]) == [13, 11]


def test_shortcut_script_maps_every_key():
    script = appstate.shortcut_script(appstate.REVIEW_KEYS)
    for key, widget in appstate.REVIEW_KEYS.items():
        assert f'"{key}": "{widget}"' in script
    assert set(appstate.REVIEW_KEYS) == set(appstate.REVIEW_KEY_HELP)
    assert "isContentEditable" in script  # typing in fields is left alone
    # Streamlit's own shortcuts (R reruns, C clears caches) would race ours.
    assert not {"r", "c"} & set(appstate.REVIEW_KEYS)


def test_top_influences_and_search():
    rng = np.random.default_rng(0)
    per_query = pd.DataFrame(
        {
            "query_index": np.repeat([0, 1], 6),
            "train_index": np.tile(np.arange(6), 2),
            "method": "datainf",
            "score": rng.normal(size=12),
        }
    )
    helpful, harmful = appstate.top_influences(per_query, query_index=1, method="datainf", k=2)
    mine = per_query[per_query["query_index"] == 1].sort_values("score")
    assert helpful["train_index"].tolist() == mine["train_index"].head(2).tolist()
    assert harmful["train_index"].tolist() == mine["train_index"].tail(2)[::-1].tolist()
    df = pd.DataFrame({"text": ["A cat", "a dog", "bird"], "label": [0, 1, 1]})
    assert appstate.search_rows(df, text="a ", columns=["text"]).index.tolist() == [0, 1]
    found = appstate.search_rows(df, columns=["text"], label_column="label", labels=["1"])
    assert found.index.tolist() == [1, 2]


def test_job_status_and_eta(tmp_path):
    path = tmp_path / "job.json"
    assert appstate.job_state(path)["state"] == "missing"
    appstate.write_status(path, state="running", pid=os.getpid(), done=5, total=10, started=100.0)
    state = appstate.job_state(path)
    assert state["state"] == "running"
    assert appstate.progress_fraction(state) == 0.5
    assert appstate.estimate_eta(state, now=110.0) == pytest.approx(10.0)
    appstate.write_status(path, pid=2**22 + 12345)  # no such process
    dead = appstate.job_state(path)
    assert dead["state"] == "failed"
    assert "stopped" in dead["error"]
    assert appstate.format_seconds(None) == "–"
    assert appstate.format_seconds(65) == "1 min 05 s"
    assert appstate.format_seconds(3725) == "1 h 02 min"
    assert appstate.format_score(-185_700.4) == "-185,700"
    assert appstate.format_score(0.012345) == "+0.01235"


def test_build_demo_renames_when_complete(tmp_path, monkeypatch):
    import datainf_core.demos.text as text_demo

    calls = []

    def fake_build(root, *, progress=None, **kwargs):
        calls.append(Path(root).name)
        assert not (tmp_path / "text").exists()  # never a half-built demo at the real path
        Path(root).mkdir(parents=True)
        (Path(root) / "project.toml").write_text('name = "x"\n')
        progress(1, 1, "training")

    monkeypatch.setattr(text_demo, "build_text_demo", fake_build)
    status = tmp_path / ".text-build.json"
    code = appstate.main(["build-demo", "text", str(tmp_path / "text"), "--status", str(status)])
    assert code == 0
    assert calls == [".text.building"]
    assert appstate.is_project(tmp_path / "text")
    assert appstate.job_state(status)["state"] == "done"
    assert appstate.demo_is_built("text", base=tmp_path)


# ---- AppTest on every page -----------------------------------------------------------------


def _app(monkeypatch, **env: str) -> AppTest:
    for name in ("DATAINF_PROJECT", "DATAINF_OPEN_DEMO"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    return at


def _visit_all(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    for page in PAGES:
        at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert not at.error, (page, [e.value for e in at.error])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny classification project with one finished run (made by runs.execute_run)."""
    project = make_tiny_classification_project(
        tmp_path_factory.mktemp("app"), n_train=24, n_validation=6, noise=0.25
    )
    settings = runs.RunSettings(methods=["datainf", "hessian_free"], per_query=True)
    folder = runs.execute_run(project, settings)
    return project, Path(folder).name


def test_pages_without_project(monkeypatch, tmp_path):
    monkeypatch.setenv("DATAINF_DEMO_DIR", str(tmp_path))
    at = _app(monkeypatch)
    _visit_all(at)
    at.switch_page("pages/review.py").run()
    assert any("No project is open" in i.value for i in at.info)


def test_pages_with_tiny_project(monkeypatch, tiny):
    project, run_id = tiny
    at = _app(monkeypatch, DATAINF_PROJECT=str(project.root))
    assert any(project.name in m.value for m in at.sidebar.markdown)
    _visit_all(at)
    at.switch_page("pages/explorer.py").run()
    assert at.selectbox(key="explorer_run").value == run_id
    assert any("Positive = harmful" in i.value for i in at.info)  # the sign is explained
    assert len(at.tabs) == 2
    at.switch_page("pages/evaluate.py").run()
    assert any("What the combined ranking averages" in m.value for m in at.markdown)
    fit_boxes = [b.value for b in [*at.warning, *at.success] if "Fit check" in b.value]
    assert fit_boxes == [evaluate.fit_message(runs.load_evaluation(project, run_id)["fit"])]
    weights = runs.load_evaluation(project, run_id)["combined_weights"]
    assert weights == {
        "datainf_cosine": 0.3333, "hessian_free_cosine": 0.3333, "self_influence": 0.3333
    }  # fmt: skip


def test_pages_with_generation_project_and_no_run(monkeypatch, tmp_path):
    project = make_tiny_generation_project(tmp_path)
    at = _app(monkeypatch, DATAINF_PROJECT=str(project.root))
    _visit_all(at)
    at.switch_page("pages/review.py").run()
    assert at.button(key="review_keep").disabled is False
    at.button(key="review_keep").click().run()
    assert ReviewStore(project.reviews_path).counts()["keep"] == 1
    assert not at.exception


def test_review_actions_change_database(monkeypatch, tiny):
    project, _ = tiny
    store = ReviewStore(project.reviews_path)
    at = _app(monkeypatch, DATAINF_PROJECT=str(project.root))
    at.switch_page("pages/review.py").run()
    assert at.selectbox(key="review_signal").value == "combined"
    first = at.session_state["review_cursor"]
    signals = runs.load_signals(project, runs.latest_run(project))
    assert first == int(signals.sort_values("combined", ascending=False)["train_index"].iloc[0])
    at.button(key="review_relabel").click().run()
    assert not at.exception
    decision = store.decision(first)
    label = pd.read_csv(project.train_path)["label"].iloc[first]
    assert decision["action"] == "relabel"
    assert decision["corrected_label"] != label  # pre-filled with the other label
    second = at.session_state["review_cursor"]
    assert second != first  # moved on to the next sample
    at.button(key="review_exclude").click().run()
    assert store.decision(second)["action"] == "exclude"
    at.button(key="review_undo").click().run()
    assert store.decision(second) is None
    at.button(key="review_redo").click().run()
    assert store.decision(second)["action"] == "exclude"
    # Filters: only relabelled samples left in the queue.
    at.multiselect(key="review_filter_status").set_value(["relabel"]).run()
    assert at.session_state["review_cursor"] == first
    assert not at.exception
    # A fresh session (a reload) sees the same decisions.
    again = _app(monkeypatch, DATAINF_PROJECT=str(project.root))
    again.switch_page("pages/review.py").run()
    assert "Relabel: **1**" in " ".join(c.value for c in again.caption)
    store.undo()
    store.undo()
    assert store.counts()["reviewed"] == 0


def test_export_page_saves_file(monkeypatch, tiny, tmp_path):
    project, _ = tiny
    store = ReviewStore(project.reviews_path)
    store.record(1, "exclude")
    store.record(2, "relabel", corrected_label="positive")
    try:
        at = _app(monkeypatch, DATAINF_PROJECT=str(project.root))
        at.switch_page("pages/export.py").run()
        assert not at.exception
        target = tmp_path / "clean.jsonl"
        at.radio(key="export_format").set_value("jsonl").run()
        at.text_input(key="export_path_jsonl").set_value(str(target)).run()
        at.button(key="export_save").click().run()
        assert not at.error, [e.value for e in at.error]
        back = pd.read_json(target, lines=True)
        assert len(back) == 23
        assert back.loc[1, "label"] == "positive"  # row 2 of the input, relabelled
        assert back["score"].notna().all()
        # Saving over the train file is refused with st.error, and the page keeps working.
        at.text_input(key="export_path_jsonl").set_value(str(project.train_path)).run()
        at.button(key="export_save").click().run()
        assert any("refusing to write" in e.value for e in at.error)
        assert not at.exception
    finally:
        store.undo()
        store.undo()


def test_bad_project_path_shows_error(monkeypatch, tmp_path):
    at = _app(monkeypatch, DATAINF_PROJECT=str(tmp_path / "nowhere"))
    assert not at.exception
    assert any("project.toml" in e.value or "nowhere" in e.value for e in at.error)
    at.text_input(key="projects_open_path").set_value(str(tmp_path)).run()
    at.button(key="projects_open").click().run()
    assert not at.exception
    assert at.error


def test_demo_is_built_with_progress(monkeypatch, tmp_path, tiny):
    monkeypatch.setenv("DATAINF_DEMO_DIR", str(tmp_path))
    status = appstate.demo_status_path("text")
    # A build in progress (this process stands in for the worker): a progress bar, no new worker.
    appstate.write_status(status, state="running", pid=os.getpid(), done=3, total=10,
                          stage="training", started=time.time())  # fmt: skip
    at = _app(monkeypatch, DATAINF_OPEN_DEMO="text")
    assert not at.exception
    assert "training" in json.dumps([str(p.proto) for p in at.get("progress")])
    # Once the demo folder holds a project, the app opens it.
    project, _ = tiny
    (tmp_path / "text").symlink_to(project.root)
    at2 = _app(monkeypatch, DATAINF_OPEN_DEMO="text")
    assert at2.session_state["project_root"] == str(tmp_path / "text")
    assert not at2.exception


def test_run_page_starts_and_finishes_a_run(monkeypatch, tiny):
    project, _ = tiny
    before = {r.run_id for r in runs.list_runs(project)}
    at = _app(monkeypatch, DATAINF_PROJECT=str(project.root))
    at.switch_page("pages/run.py").run()
    at.checkbox(key="run_m_datainf").check()
    at.checkbox(key="run_m_hessian_free").uncheck()
    at.checkbox(key="run_per_query").uncheck()
    at.checkbox(key="run_self").uncheck()
    at.checkbox(key="run_loss").uncheck()
    next(b for b in at.button if b.label == "Start run").click().run()
    assert not at.exception
    new = [r for r in runs.list_runs(project) if r.run_id not in before]
    assert len(new) == 1
    deadline = time.time() + 120
    while time.time() < deadline:
        state = runs.read_status(project, new[0].run_id)["state"]
        if state in runs.FINISHED:
            break
        time.sleep(0.5)
    assert state == "done", runs.read_status(project, new[0].run_id)
    at.run()
    assert not at.exception
    assert runs.load_signals(project, new[0].run_id)["datainf"].notna().all()


def test_retrain_on_cleaned(tiny):
    project, _ = tiny
    (Path(project.adapter_path) / "train_settings.json").write_text(
        json.dumps({"settings": {"epochs": 2, "rank": 2, "batch_size": 8, "patience": None}})
    )
    store = ReviewStore(project.reviews_path)
    store.record([0, 1], "exclude")
    try:
        toml_before = project.project_file.read_bytes()
        result = appstate.retrain_on_cleaned(project)
    finally:
        store.undo()
    assert result["train_rows"] == 22
    assert set(result["before"]) >= {"val_loss", "val_accuracy"}
    assert np.isfinite(result["after"]["val_loss"])
    assert Path(result["adapter_path"]).is_dir()
    assert project.project_file.read_bytes() == toml_before  # the project is left alone


def test_predict_labels_matches_one_by_one(tiny):
    import torch

    from datainf_core import data, models

    project, _ = tiny
    model = models.load_adapted_model(project, device="cpu", is_trainable=False)
    tokenizer = models.load_tokenizer(project)
    df = data.load_split(project, "train").iloc[:7]
    batched = appstate.predict_labels(project, model, tokenizer, df, batch_size=3)
    expected = []
    with torch.no_grad():
        for text in df["text"]:
            encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=32)
            expected.append(project.data.labels[int(model(**encoded).logits.argmax())])
    assert batched.tolist() == expected


def _fake_run(project, n_train: int, n_query: int) -> str:
    """A finished run folder written by hand (the layout of ARCHITECTURE.md), for page rendering."""
    rng = np.random.default_rng(0)
    run_id = "20260101-000000-000-test"
    folder = project.runs_dir / run_id
    folder.mkdir(parents=True)
    query, train = np.meshgrid(np.arange(n_query), np.arange(n_train), indexing="ij")
    per_query = pd.DataFrame(
        {"query_index": query.ravel(), "train_index": train.ravel(), "method": "datainf",
         "score": rng.normal(size=query.size)}
    )  # fmt: skip
    per_query.to_parquet(folder / "per_query.parquet")
    scores = per_query.groupby(["train_index", "method"], as_index=False)["score"].sum()
    scores.to_parquet(folder / "scores.parquet")
    signals = pd.DataFrame({"train_index": np.arange(n_train), "datainf": scores["score"]})
    signals["combined"] = signals["datainf"].rank(pct=True)
    signals.to_parquet(folder / "signals.parquet")
    settings = {"methods": ["datainf"], "per_query": True}
    (folder / "settings.json").write_text(json.dumps({"run_id": run_id, "settings": settings}))
    (folder / "status.json").write_text(json.dumps({"run_id": run_id, "state": "done"}))
    return run_id


def test_pages_with_image_project(monkeypatch, tmp_path):
    from PIL import Image

    from datainf_core.project import create_project

    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (8, 8), (40 * i, 90, 200 - 40 * i)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": f"a square of colour {i}"})
    pd.DataFrame(rows).to_json(folder / "metadata.jsonl", orient="records", lines=True)
    project = create_project(
        tmp_path / "proj", task="text-to-image", base="org/unused", train=folder, validation=folder
    )
    _fake_run(project, n_train=4, n_query=4)
    at = _app(monkeypatch, DATAINF_PROJECT=str(project.root))
    _visit_all(at)
    at.switch_page("pages/explorer.py").run()
    images = [e for e in at.main if getattr(e, "type", "") == "image"]
    assert len(images) >= 3  # the query and its influential training images
    assert not any("cannot be shown" in c.value for c in at.caption)
    at.switch_page("pages/review.py").run()
    at.button(key="review_exclude").click().run()
    assert ReviewStore(project.reviews_path).counts()["exclude"] == 1
    assert not at.exception


def test_loss_tokens_caption_reads_the_resolved_setting():
    assert "prompt" in appstate.loss_tokens_caption({"loss_tokens": "prompt"})
    assert "response" in appstate.loss_tokens_caption({"settings": {"loss_tokens": "response"}})
    assert appstate.loss_tokens_caption({"loss_tokens": None}) is None
    assert appstate.loss_tokens_caption({}) is None
