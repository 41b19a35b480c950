"""End to end in Debian's Chromium: open, run, explore, review with shortcuts, reload, export.

The app runs as a real Streamlit server on a free localhost port with a tiny project; Playwright
drives ``/usr/bin/chromium`` (never a downloaded browser). Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from fixtures import make_tiny_classification_project

from datainf_core import runs
from datainf_core.review import ReviewStore

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Streamlit server with a tiny project open; yields ``(base_url, project)``."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    project = make_tiny_classification_project(
        tmp_path_factory.mktemp("browser"), n_train=24, n_validation=6, noise=0.25
    )
    port = _free_port()
    env = dict(os.environ)
    env.update(
        DATAINF_PROJECT=str(project.root),
        DATAINF_DEMO_DIR=str(tmp_path_factory.mktemp("demos")),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("DATAINF_OPEN_DEMO", None)
    log = open(tmp_path_factory.mktemp("log") / "streamlit.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.headless", "true", "--server.address", "127.0.0.1",
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("streamlit did not answer /_stcore/health within 60 s")
    yield base, project
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # Streamlit scrolls inside its own container: a tall viewport shows the whole page.
        context = browser.new_context(
            viewport={"width": 1400, "height": 1600}, accept_downloads=True
        )
        page = context.new_page()
        # A busy 2-core CI machine can take tens of seconds per rerun: wait generously.
        page.set_default_timeout(90_000)
        yield page
        browser.close()


def _settle(page, quiet: float = 0.6, timeout: float = 60.0) -> None:
    """Waits until the script stopped running and nothing is stale for ``quiet`` seconds."""
    calm = None
    deadline = time.time() + timeout
    while time.time() < deadline:
        busy = page.evaluate(
            "() => !!document.querySelector('[data-testid=stStatusWidget], "
            "[data-testid=stSkeleton], [data-testid=stSkeletonElement]')"
            " || document.querySelectorAll('[data-stale=true]').length > 0"
        )
        if busy:
            calm = None
        elif calm is None:
            calm = time.time()
        elif time.time() - calm > quiet:
            return
        time.sleep(0.1)


def _open(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("[data-testid=stSidebarNav]", timeout=60_000)
    _settle(page)


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"))
    print(f"{time.strftime('%H:%M:%S')} screenshot {name}", flush=True)


def _cursor(page) -> int:
    text = page.get_by_text(re.compile(r"Training sample #\d+")).first.inner_text()
    return int(re.search(r"#(\d+)", text).group(1))


def test_end_to_end(server, page, tmp_path):
    base, project = server
    store = ReviewStore(project.reviews_path)

    # 1. The app opens with the project.
    _open(page, base)
    page.get_by_text("Open: tiny classification").wait_for()
    _shot(page, "1-projects")

    # 2. Start a run (one method, to keep it short) and wait for it.
    _open(page, f"{base}/run")
    page.get_by_text("hessian_free").click()  # untick the second default method
    _settle(page)
    page.get_by_role("button", name="Start run").click()
    deadline = time.time() + 120
    run_id = None
    while time.time() < deadline:
        infos = runs.list_runs(project)
        if infos and infos[0].state in runs.FINISHED:
            run_id = infos[0].run_id
            break
        time.sleep(0.5)
    assert run_id is not None, "the run did not finish within 120 s"
    assert runs.read_status(project, run_id)["state"] == "done"
    page.get_by_text("No run in progress.").wait_for(timeout=30_000)
    _settle(page)
    _shot(page, "2-run")

    # 3. A validation sample's most helpful and most harmful training samples.
    _open(page, f"{base}/explorer")
    query = pd.read_csv(project.validation_path)["text"].iloc[3]
    page.get_by_label("Search validation samples").fill(query)
    page.get_by_label("Search validation samples").press("Enter")
    _settle(page)
    page.get_by_text("Validation sample #3").wait_for()
    page.get_by_text("Most helpful training samples (negative)").wait_for()
    page.get_by_text("Most harmful training samples (positive)").wait_for()
    assert page.get_by_text(re.compile(r"train #\d+")).count() >= 6
    _shot(page, "3-explorer")

    # 4. Relabel one sample and exclude another with the keyboard shortcuts.
    _open(page, f"{base}/review")
    first = _cursor(page)
    page.get_by_role("heading", name="Review suspected mislabels").click()  # focus the page
    page.keyboard.press("l")
    _settle(page)
    second = _cursor(page)
    assert second != first
    page.keyboard.press("x")
    _settle(page)
    current = store.current().set_index("train_index")
    assert current.loc[first, "action"] == "relabel"
    assert current.loc[second, "action"] == "exclude"
    _shot(page, "4-review")

    # 5. A reload keeps both decisions.
    page.reload()
    page.wait_for_selector("[data-testid=stSidebarNav]", timeout=60_000)
    _settle(page)
    page.get_by_text("Reviewed 2 of 24").wait_for()
    assert page.get_by_text(re.compile(r"Relabel: 1 · Exclude: 1")).count() == 1

    # 6. Export: save to a path and download; check both files.
    _open(page, f"{base}/export")
    _shot(page, "5-export")
    target = tmp_path / "cleaned.csv"
    page.get_by_label("Save to path").fill(str(target))
    page.get_by_label("Save to path").press("Enter")
    _settle(page)
    page.get_by_role("button", name="Save", exact=True).click()
    page.get_by_text(re.compile("Saved 23 rows")).wait_for()
    with page.expect_download() as download:
        page.get_by_role("button", name="Download CSV").click()
    downloaded = tmp_path / "download.csv"
    download.value.save_as(downloaded)
    original = pd.read_csv(project.train_path)
    for path in (target, downloaded):
        out = pd.read_csv(path)
        assert len(out) == len(original) - 1
        assert original["text"].iloc[second] not in out["text"].tolist()
        row = out[out["text"] == original["text"].iloc[first]].iloc[0]
        assert row["action"] == "relabel"
        assert row["label"] == row["corrected_label"] != row["original_label"]
    assert pd.read_csv(project.train_path).equals(original)  # the source is untouched
