"""The benchmark report writer turns fake result JSONs into BENCHMARKS.md (no benchmark runs)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_report"] = module
    spec.loader.exec_module(module)
    return module


MACHINE = {
    "cpu": "Fake CPU 3000",
    "cores": 2,
    "ram_gib": 24.0,
    "os": "Linux",
    "gpu": "none",
    "commit": "abc1234",
    "date": "2026-12-03 16:40 UTC",
}
VERSIONS = {"python": "3.11.7", "torch": "2.13.0", "kronfluence": "1.0.1"}


def _fake_results(folder: Path, report) -> None:
    engine_runs = [
        {"rows": [{"n": 1000, "m": 32, "mode": "per-query", "ours_s": t, "plain_s": 4.0}]}
        for t in (0.010, 0.012, 0.011)
    ]
    files = {
        "engine": report.merge_repeats(engine_runs),
        "fidelity": {
            "summary": "DataInf tracks Exact best at every rank.",
            "table": [
                {"rank": 1, "datainf": 0.91, "hessian_free": 0.55, "lissa": 0.40},
                {"rank": "paper (MRPC, r=1)", "datainf": 0.64, "hessian_free": 0.5, "lissa": 0.45},
            ],
            "rows": [
                {"rank": 1, "method": "datainf", "pearson": 0.91},
                {"rank": 1, "method": "lissa", "pearson": 0.40},
            ],
        },
        "peers": {
            "rows": [
                {"tool": "DataInf Studio", "method": "datainf", "seconds": 3.2, "auc": 0.81},
                {"tool": "kronfluence", "method": "ekfac", "seconds": 40.1, "auc": 0.79},
            ]
        },
        "gpu": {"available": False, "note": "no CUDA device on this machine"},
        "text_demo": {
            "runs": {
                "seed0/default": {"detection": {"single": {"datainf": 0.8, "train_loss": 0.9}}},
                "seed0/overfit": {"detection": {"single": {"datainf": 0.85, "train_loss": 0.6}}},
            },
            "curves": {
                "datainf": {"fraction_inspected": [0, 0.5, 1], "fraction_found": [0, 0.8, 1]}
            },
        },
    }
    for name, data in files.items():
        (folder / f"{name}.json").write_text(json.dumps(data))


def test_report_has_machine_versions_and_tables(tmp_path: Path, report) -> None:
    _fake_results(tmp_path, report)
    outcomes = {
        "engine": {"status": "ok", "seconds": [5.0, 5.2, 5.1], "repeats": 3},
        "identification": {
            "status": "timeout",
            "seconds": [300.0],
            "repeats": 1,
            "error_tail": "killed after 300 s",
        },
    }
    out = report.write_report(
        tmp_path, tmp_path / "BENCHMARKS.md", outcomes=outcomes, machine=MACHINE, versions=VERSIONS
    )
    text = out.read_text()
    assert "| CPU | Fake CPU 3000 |" in text
    assert "| RAM (GiB) | 24 |" in text
    assert "| python | torch | kronfluence |" in text
    assert "2026-12-03 16:40 UTC" in text
    # Every section is there, in order, whether or not it has a result.
    titles = [title for _, title, _ in report.SECTIONS]
    positions = [text.index(f"## {title}") for title in titles]
    assert positions == sorted(positions)
    # Repeats print as median [min–max].
    assert "| 1,000 | 32 | per-query | 0.011 [0.01–0.012] | 4 |" in text
    assert "3 runs, numbers shown as median [min–max]" in text
    # The fidelity table with the paper's reference row.
    assert "| rank | datainf | hessian_free | lissa |" in text
    assert "| paper (MRPC, r=1) | 0.64 | 0.5 | 0.45 |" in text
    assert "DataInf tracks Exact best at every rank." in text
    assert "| kronfluence | ekfac | 40.1 | 0.79 |" in text
    assert "no CUDA device on this machine" in text
    # A timed-out benchmark says so, with its log tail.
    assert "Status: timeout" in text and "killed after 300 s" in text
    # Records (one per seed/regime) become one table with a row each.
    assert "| seed0/default | 0.8 | 0.9 |" in text and "| seed0/overfit | 0.85 | 0.6 |" in text


def test_merge_repeats_keeps_equal_values_and_spreads_others(report) -> None:
    merged = report.merge_repeats([{"n": 5, "t": [1.0, 2.0]}, {"n": 5, "t": [3.0, 2.0]}])
    assert merged["n"] == 5
    assert merged["t"][0] == {report.SPREAD_KEY: [1.0, 3.0]}
    assert merged["t"][1] == 2.0
    assert report.format_value(merged["t"][0]) == "2 [1–3]"


def test_curves_are_found_for_plots(report) -> None:
    data = {
        "a": {"detection_curve": {"x": {"fraction_inspected": [0, 1], "fraction_found": [0, 1]}}}
    }
    assert list(report.find_curves(data)) == ["a/detection_curve/x"]
