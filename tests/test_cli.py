"""The datainf CLI: exit codes, one-line errors without tracebacks, and the main subcommands."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from fixtures import make_tiny_classification_project

from datainf_core import cli
from datainf_core.project import PROJECT_FILE, load_project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_tiny_classification_project(tmp_path_factory.mktemp("cli"), n_train=16, noise=0.25)


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in (".csv", ".jsonl", ".parquet", ".toml", ".safetensors")
    }


def assert_one_line_error(capsys, pattern: str) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    assert pd.Series([lines[0]]).str.contains(pattern, regex=True).all(), lines[0]


def test_new_creates_project(tmp_path: Path, capsys) -> None:
    df = pd.DataFrame({"sentence": ["good", "bad"], "y": ["pos", "neg"]})
    df.to_csv(tmp_path / "train.csv", index=False)
    df.to_csv(tmp_path / "val.csv", index=False)
    (tmp_path / "base").mkdir()
    argv = ["new", str(tmp_path / "p"), "--task", "classification", "--base", str(tmp_path / "base"),
            "--train", str(tmp_path / "train.csv"), "--validation", str(tmp_path / "val.csv"),
            "--text-column", "sentence", "--label-column", "y", "--labels", "neg,pos"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "created" in out and "datainf train" in out
    project = load_project(tmp_path / "p")
    assert project.data.labels == ["neg", "pos"] and project.data.text_column == "sentence"
    # A second `new` in the same folder is a user error.
    assert cli.main(argv) == 2
    assert_one_line_error(capsys, "already has a project.toml")


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["run", "/nonexistent/project"], "project folder not found"),
        (["info", "/tmp"], r"no project.toml in /tmp"),
        (["run"], r"the following arguments are required: dir"),
        (["frobnicate"], r"invalid choice: 'frobnicate'"),
        (
            [
                "new",
                "x",
                "--task",
                "regression",
                "--base",
                "b",
                "--train",
                "t",
                "--validation",
                "v",
            ],
            r"invalid choice: 'regression'",
        ),
        (
            [
                "new",
                "x",
                "--task",
                "classification",
                "--base",
                "b",
                "--train",
                "/no/t.csv",
                "--validation",
                "v",
            ],
            r"train file not found",
        ),
    ],
    ids=[
        "missing project",
        "no toml",
        "missing arg",
        "bad command",
        "bad task",
        "missing train file",
    ],
)
def test_user_errors_exit_2_with_one_line(argv, pattern, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    assert_one_line_error(capsys, pattern)


def test_bad_project_toml_leaves_sources_untouched(project, tmp_path: Path, capsys) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(project.root, root, ignore=shutil.ignore_patterns("runs", "gradients"))
    toml = (root / PROJECT_FILE).read_text()
    (root / PROJECT_FILE).write_text(toml.replace("[data]", "[data]\ncolour = 1"))
    before = digests(root)
    for command in (
        ["run", str(root)],
        ["info", str(root)],
        ["export", str(root), "--out", str(tmp_path / "o.csv")],
    ):
        assert cli.main(command) == 2
        assert_one_line_error(capsys, r"unknown key 'colour' in \[data\]")
    assert digests(root) == before


def test_info(project, capsys) -> None:
    assert cli.main(["info", str(project.root)]) == 0
    out = capsys.readouterr().out
    assert "tiny classification (classification)" in out
    assert "16 rows" in out and "negative:" in out


def test_run_prints_results_and_suspects(project, capsys) -> None:
    before = digests(project.root)
    code = cli.main(["run", str(project.root), "--method", "datainf", "--method", "hessian_free", "--no-progress", "--top", "5"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "results in " + str(project.runs_dir) in out
    assert "detection AUC (is_noisy known): datainf" in out
    assert "top 5 suspects" in out
    suspect_lines = out.split("top 5 suspects")[1].strip().splitlines()[1:]
    assert len(suspect_lines) == 5 and all("[" in line for line in suspect_lines)
    after = digests(project.root)
    assert {name: after[name] for name in before} == before  # sources untouched


def test_run_bad_method_is_one_line(project, capsys) -> None:
    assert cli.main(["run", str(project.root), "--method", "tracin"]) == 2
    assert_one_line_error(capsys, "unknown influence method 'tracin'")


def test_export_round_trip(project, tmp_path: Path, capsys) -> None:
    out = tmp_path / "clean.csv"
    assert cli.main(["export", str(project.root), "--format", "csv", "--out", str(out)]) == 0
    assert "exported to" in capsys.readouterr().out
    exported = pd.read_csv(out)
    assert len(exported) == 16 and "original_label" in exported.columns
    # Never over a source file.
    assert (
        cli.main(["export", str(project.root), "--format", "csv", "--out", str(project.train_path)])
        == 2
    )
    assert "error: " in capsys.readouterr().err


def test_ctrl_c_exits_130(monkeypatch, capsys) -> None:
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_info", interrupted)
    assert cli.main(["info", "anything"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_disk_full_is_one_line(monkeypatch, capsys) -> None:
    def full(args):
        raise OSError(28, "No space left on device", "/data/store")

    monkeypatch.setattr(cli, "_cmd_info", full)
    assert cli.main(["info", "anything"]) == 2
    assert_one_line_error(capsys, "No space left on device")


def test_help_and_version(capsys) -> None:
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli.main(["demo", "--help"]) == 0
    assert cli.main(["--version"]) == 0


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "datainf_core", "info", str(tmp_path / "none")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: project folder not found")
    assert "Traceback" not in done.stderr


def test_run_settings_survive_the_worker_command_line() -> None:
    """The app starts runs as `datainf run ...`: every setting must reach the worker."""
    from datainf_core import runs

    settings = runs.RunSettings(
        methods=["datainf", "lissa_cosine"], per_query=True, damping=0.25, device="cpu",
        loss_tokens="prompt", self_influence=False, train_loss=False, nproc=2, projection_dim=512,
    )  # fmt: skip
    args = cli.build_parser().parse_args(["run", "DIR", *runs.settings_to_argv(settings)])
    again = cli.run_settings(args)
    assert again == settings
