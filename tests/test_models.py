"""models.py: loading base + LoRA adapter safely, and refusing adapters/models that do not fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fixtures import make_tiny_classification_project, make_tiny_generation_project

from datainf_core import models
from datainf_core.errors import ModelError
from datainf_core.project import Project, load_project


@pytest.fixture(scope="module")
def cls_project(tmp_path_factory) -> Project:
    return make_tiny_classification_project(tmp_path_factory.mktemp("cls"), n_train=8, noise=0.0)


@pytest.fixture(scope="module")
def gen_project(tmp_path_factory) -> Project:
    return make_tiny_generation_project(tmp_path_factory.mktemp("gen"), n_train=4, n_validation=2)


@pytest.fixture
def copy_of(tmp_path: Path):
    """A private copy of a project folder, so a test can break it."""

    def make(project: Project) -> Project:
        target = tmp_path / project.root.name
        shutil.copytree(project.root, target)
        return load_project(target)

    return make


def test_load_adapted_classifier(cls_project: Project) -> None:
    model = models.load_adapted_model(cls_project, device="cpu")
    assert not model.training
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert any("classifier" in n for n in trainable)  # modules_to_save
    assert model.config.num_labels == 2
    assert model.config.id2label == {0: "negative", 1: "positive"}
    tokenizer = models.load_tokenizer(cls_project)
    batch = tokenizer(["good film"], return_tensors="pt")
    assert model(**batch).logits.shape == (1, 2)
    frozen = models.load_adapted_model(cls_project, device="cpu", is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_load_adapted_causal_lm(gen_project: Project) -> None:
    model = models.load_adapted_model(gen_project, device="cpu")
    tokenizer = models.load_tokenizer(gen_project)
    assert tokenizer.pad_token_id is not None
    ids = tokenizer(["what do cats like ?"], return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == 15
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_causal_lm_logits_only_where_targets_are(gen_project: Project) -> None:
    """Logits at the kept positions equal the full forward's, and so does the loss."""
    model = models.load_adapted_model(gen_project, device="cpu")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 15, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # a right-padded row
    labels = ids.clone()
    labels[:, :6] = -100  # the prompt of every row
    labels[1, 6:8] = -100
    labels[2, 9:] = -100
    logits, targets = models.causal_lm_logits(model, ids, mask, labels)
    full = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    assert logits.shape == (3, 6, 15)  # positions 5..10 predict tokens 6..11
    torch.testing.assert_close(logits, full[:, 5:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(targets, labels[:, 6:])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    expected = torch.nn.functional.cross_entropy(full.flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)

    class NoKeep(torch.nn.Module):  # a model whose forward has no logits_to_keep
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    logits, targets = models.causal_lm_logits(NoKeep(model), ids, mask, labels)
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(targets, labels[:, 1:])


def test_safe_defaults_are_passed(cls_project: Project, monkeypatch) -> None:
    import transformers

    seen = {}
    original = transformers.AutoModelForSequenceClassification.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", spy)
    models.load_base_model(cls_project, device="cpu")
    assert seen["trust_remote_code"] is False
    assert seen["use_safetensors"] is True
    assert seen["num_labels"] == 2


def test_adapter_of_another_base_is_refused(cls_project: Project, copy_of) -> None:
    project = copy_of(cls_project)
    config_path = project.adapter_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "someone/other-model"
    config_path.write_text(json.dumps(config))
    with pytest.raises(
        ModelError, match=r"was trained on base model 'someone/other-model'.*retrain"
    ):
        models.load_adapted_model(project, device="cpu")


def test_moved_project_still_matches(cls_project: Project, copy_of) -> None:
    # The adapter recorded the base's old absolute path; the folder name still matches.
    project = copy_of(cls_project)
    models.check_adapter_matches_base(project)


def test_adapter_with_no_lora_tensors(cls_project: Project, copy_of) -> None:
    from safetensors.torch import save_file

    project = copy_of(cls_project)
    save_file(
        {"something.weight": torch.zeros(2, 2)}, project.adapter_path / "adapter_model.safetensors"
    )
    with pytest.raises(ModelError, match="holds no LoRA tensors"):
        models.load_adapted_model(project, device="cpu")


def test_adapter_folder_problems(cls_project: Project, copy_of) -> None:
    project = copy_of(cls_project)
    (project.adapter_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="adapter_config.json is not valid JSON"):
        models.check_adapter_matches_base(project)
    (project.adapter_path / "adapter_config.json").unlink()
    with pytest.raises(ModelError, match="is not a PEFT adapter folder"):
        models.check_adapter_matches_base(project)
    project.model.adapter = None
    with pytest.raises(ModelError, match="datainf train"):
        models.load_adapted_model(project)


def test_pickle_adapter_refused_unless_allowed(cls_project: Project, copy_of) -> None:
    from safetensors.torch import load_file

    project = copy_of(cls_project)
    weights = project.adapter_path / "adapter_model.safetensors"
    torch.save(load_file(weights), project.adapter_path / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(
        ModelError, match=r"only a pickle checkpoint \(adapter_model.bin\).*allow_pickle"
    ):
        models.load_adapted_model(project, device="cpu")
    project.model.allow_pickle = True
    model = models.load_adapted_model(project, device="cpu")
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_pickle_base_refused(cls_project: Project, copy_of) -> None:
    from safetensors.torch import load_file

    project = copy_of(cls_project)
    base = Path(project.base_location)
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    with pytest.raises(
        ModelError, match=r"base model .* has only pickle weights \(pytorch_model.bin\)"
    ):
        models.load_base_model(project, device="cpu")


def test_task_that_does_not_fit_the_model(cls_project: Project, copy_of) -> None:
    project = copy_of(cls_project)
    project.task = "generation"
    project.data.prompt_column, project.data.response_column = "text", "label"
    with pytest.raises(ModelError, match="is not a causal language model"):
        models.load_base_model(project, device="cpu")
    with pytest.raises(
        ModelError, match="task_type 'SEQ_CLS', which does not fit task 'generation'"
    ):
        models.check_adapter_matches_base(project)
    project.task = "text-to-image"
    with pytest.raises(ModelError, match="diffusion.load_diffusion"):
        models.load_base_model(project)


def test_label_count_mismatch(cls_project: Project, copy_of) -> None:
    project = copy_of(cls_project)
    project.data.labels = ["a", "b", "c"]
    with pytest.raises(ModelError, match="does not fit base model"):
        models.load_adapted_model(project, device="cpu")


def test_missing_base(cls_project: Project, copy_of) -> None:
    project = copy_of(cls_project)
    shutil.rmtree(project.base_location)
    with pytest.raises(ModelError, match="cannot load the tokenizer"):
        models.load_tokenizer(project)
    with pytest.raises(ModelError, match="cannot read the config of base model"):
        models.load_base_model(project, device="cpu")


def test_create_project_checks_the_adapter(cls_project: Project, tmp_path: Path) -> None:
    from datainf_core.project import create_project

    config_path = tmp_path / "other_adapter" / "adapter_config.json"
    shutil.copytree(cls_project.adapter_path, config_path.parent)
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "someone/other-model"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="was trained on base model 'someone/other-model'"):
        create_project(
            tmp_path / "p", task="classification", base=str(cls_project.base_location),
            adapter=str(config_path.parent), train=str(cls_project.train_path),
            validation=str(cls_project.validation_path),
        )  # fmt: skip
    assert not (tmp_path / "p" / "project.toml").exists()
