"""Safe loading and safe writing: pickle, remote code, exports, server defaults.

- A pickle checkpoint (``.bin``/``.pt``) is refused unless ``allow_pickle = true``; then it is read
  with ``torch.load(weights_only=True)``, so a booby-trapped pickle still cannot run code.
- ``trust_remote_code`` stays off unless ``project.toml`` turns it on: a model folder that ships
  its own Python code does not get it executed.
- An export never replaces a source of the project (data, project.toml, reviews, models), however
  the path is spelled (relative, ``..``, symlink, hard link).
- ``.streamlit/config.toml`` binds to 127.0.0.1 with XSRF protection and no usage statistics.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from fixtures import make_tiny_classification_project
from safetensors.torch import load_file

from datainf_core import export, models
from datainf_core.errors import DataInfError, ModelError
from datainf_core.project import load_project

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_classification_project(
        tmp_path_factory.mktemp("security"), n_train=12, n_validation=4, noise=0.0
    )


def _copy_project(tiny, tmp_path: Path):
    root = tmp_path / "copy"
    shutil.copytree(tiny.root, root, ignore=shutil.ignore_patterns("runs", "gradients"))
    return load_project(root)


def _set_model(project, **values):
    for key, value in values.items():
        setattr(project.model, key, value)
    project.save()
    return load_project(project.root)


class _Trap:
    """Unpickling this calls ``Path.touch`` on a marker: the proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_base(project) -> Path:
    """Replaces the base model's safetensors with ``pytorch_model.bin`` (same tensors)."""
    base = Path(project.base_location)
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    return base


def _spy_torch_load(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


# ---- pickle checkpoints ------------------------------------------------------------------------


def test_pickle_base_refused_by_default(tiny, tmp_path):
    project = _copy_project(tiny, tmp_path)
    _pickle_base(project)
    with pytest.raises(ModelError, match="pickle") as info:
        models.load_base_model(project, device="cpu")
    assert "allow_pickle" in str(info.value) and "\n" not in str(info.value)


def test_pickle_base_loads_with_weights_only_when_allowed(tiny, tmp_path, monkeypatch):
    expected = models.load_base_model(tiny, device="cpu").state_dict()
    project = _copy_project(tiny, tmp_path)
    _pickle_base(project)
    project = _set_model(project, allow_pickle=True)
    calls = _spy_torch_load(monkeypatch)
    model = models.load_base_model(project, device="cpu")
    assert calls and all(call.get("weights_only") is True for call in calls), calls
    for name, value in model.state_dict().items():
        if "classifier" not in name:  # the head is re-initialised for the project's labels
            torch.testing.assert_close(value, expected[name])


def test_pickle_adapter_refused_then_weights_only(tiny, tmp_path, monkeypatch):
    project = _copy_project(tiny, tmp_path)
    adapter = project.adapter_path
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="pickle"):
        models.check_adapter_matches_base(project)
    project = _set_model(project, allow_pickle=True)
    calls = _spy_torch_load(monkeypatch)
    models.check_adapter_matches_base(project)
    assert calls and all(call.get("weights_only") is True for call in calls), calls


@pytest.mark.parametrize("where", ["adapter", "base"])
def test_booby_trapped_pickle_never_runs(tiny, tmp_path, where):
    """Even with allow_pickle, a pickle that would run code is refused (weights_only=True)."""
    project = _copy_project(tiny, tmp_path)
    marker = tmp_path / "pwned"
    if where == "adapter":
        folder = project.adapter_path
        (folder / "adapter_model.safetensors").unlink()
        target = folder / "adapter_model.bin"
    else:
        folder = Path(project.base_location)
        (folder / "model.safetensors").unlink()
        target = folder / "pytorch_model.bin"
    with open(target, "wb") as handle:
        pickle.dump({"weight": _Trap(marker)}, handle)
    project = _set_model(project, allow_pickle=True)
    with pytest.raises(DataInfError):
        if where == "adapter":
            models.check_adapter_matches_base(project)
        else:
            models.load_base_model(project, device="cpu")
    assert not marker.exists(), "unpickling ran code"


# ---- remote code -----------------------------------------------------------------------------


def _remote_code_base(project, marker: Path) -> Path:
    """Gives the base model an ``auto_map`` to its own config code that touches ``marker``."""
    base = Path(project.base_location)
    (base / "configuration_custom.py").write_text(
        "from pathlib import Path\n"
        "from transformers import BertConfig\n"
        f"Path({str(marker)!r}).touch()\n"
        "class CustomConfig(BertConfig):\n"
        "    model_type = 'bert'\n"
    )
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (base / "config.json").write_text(json.dumps(config))
    return base


def test_trust_remote_code_is_off_by_default(tiny, tmp_path):
    project = _copy_project(tiny, tmp_path)
    assert project.model.trust_remote_code is False
    assert "trust_remote_code" not in project.project_file.read_text() or (
        "trust_remote_code = false" in project.project_file.read_text()
    )
    marker = tmp_path / "remote_code_ran"
    _remote_code_base(project, marker)
    with contextlib.suppress(DataInfError):  # refusing the folder is fine; running its code not
        models.load_base_model(project, device="cpu")
    assert not marker.exists(), "the model's own code ran without trust_remote_code"


def test_trust_remote_code_only_when_the_project_says_so(tiny, tmp_path):
    project = _copy_project(tiny, tmp_path)
    marker = tmp_path / "remote_code_ran"
    _remote_code_base(project, marker)
    project = _set_model(project, trust_remote_code=True)
    assert "trust_remote_code = true" in project.project_file.read_text()
    with contextlib.suppress(DataInfError):
        models.load_base_model(project, device="cpu")
    assert marker.exists(), "trust_remote_code = true in project.toml was not passed on"


# ---- exports never overwrite a source ----------------------------------------------------------


def _digests(project) -> dict[Path, str]:
    files = [p for p in project.root.rglob("*") if p.is_file()]
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize(
    "spelling",
    [
        "train",
        "validation",
        "project_toml",
        "reviews",
        "relative_dots",
        "symlink",
        "hardlink",
        "inside_adapter",
        "inside_base",
    ],
)
def test_export_never_overwrites_a_source(tiny, tmp_path, spelling, monkeypatch):
    from datainf_core.review import ReviewStore

    project = _copy_project(tiny, tmp_path)
    ReviewStore(project.reviews_path).record(0, "exclude")
    before = _digests(project)
    train = project.train_path
    outside = tmp_path / "out"
    outside.mkdir()
    monkeypatch.chdir(outside)
    target = {
        "train": train,
        "validation": project.validation_path,
        "project_toml": project.project_file,
        "reviews": project.reviews_path,
        "relative_dots": Path("..") / "copy" / "sub" / ".." / train.name,
        "symlink": outside / "link.csv",
        "hardlink": outside / "hard.csv",
        "inside_adapter": project.adapter_path / "adapter_model.safetensors",
        "inside_base": Path(project.base_location) / "model.safetensors",
    }[spelling]
    if spelling == "symlink":
        target.symlink_to(train)
    if spelling == "hardlink":
        os.link(train, target)
    with pytest.raises(export.ExportError, match="refusing") as info:
        export.export_dataset(project, target, fmt="csv", drop_excluded=True)
    assert "\n" not in str(info.value)
    assert _digests(project) == before


def test_export_to_a_new_file_is_written_whole(tiny, tmp_path):
    project = _copy_project(tiny, tmp_path)
    before = _digests(project)
    out = export.export_dataset(project, tmp_path / "clean.csv", fmt="csv")
    assert out.read_text().count("\n") == 13  # header + 12 rows
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert _digests(project) == before


# ---- server defaults -----------------------------------------------------------------------------


def test_streamlit_server_defaults_are_safe():
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    server = config["server"]
    assert server["address"] == "127.0.0.1"
    assert server["enableXsrfProtection"] is True
    assert server.get("enableCORS", True) is True
    assert 200 <= server["maxUploadSize"] <= 4096  # MB: room for datasets, not unbounded
    assert config["browser"]["gatherUsageStats"] is False
