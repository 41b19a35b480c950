"""Image demo: styles, the imagefolder layout, and the build path on a tiny base UNet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from datainf_core import diffusion
from datainf_core.demos import image


def test_digits_are_upsampled_into_unit_range() -> None:
    images, labels = image.load_digit_images()
    assert images.shape == (1797, image.IMAGE_SIZE, image.IMAGE_SIZE)
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_styles() -> None:
    square = np.zeros((1, 8, 8), dtype=np.float32)
    square[0, 2:6, 2:6] = 1.0
    assert np.array_equal(image.apply_style(square, "plain"), square)
    np.testing.assert_allclose(image.apply_style(square, "inverted"), 1.0 - square)
    outlined = image.apply_style(square, "outlined")
    assert outlined[0, 3:5, 3:5].sum() == 0.0  # hollow inside
    assert outlined[0, 2, 2] == 1.0 and outlined[0, 1, 3] == 1.0  # ring on both sides of the edge
    with pytest.raises(ValueError, match="style"):
        image.apply_style(square, "blurred")


def test_style_data_layout(tmp_path: Path) -> None:
    train, test = image.write_style_data(tmp_path, seed=1, train_per_style=4, test_per_style=2)
    assert len(train) == 12 and len(test) == 6
    assert train["category"].value_counts().eq(4).all()
    assert test["category"].value_counts().eq(2).all()
    for split, table in (("train", train), ("test", test)):
        metadata = pd.read_json(tmp_path / split / "metadata.jsonl", lines=True)
        assert list(metadata.columns) == ["file_name", "caption", "category", "digit"]
        assert all((tmp_path / split / name).exists() for name in metadata["file_name"])
        assert metadata.equals(table)
    # Captions do not name the style: identification must come from the images.
    assert not train["caption"].str.contains("|".join(image.STYLES)).any()
    again, _ = image.write_style_data(
        tmp_path / "again", seed=1, train_per_style=4, test_per_style=2
    )
    assert again.equals(train)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module) -> Path:
    """A tiny random 1-channel UNet written where the demo looks for its stored base."""
    from diffusers import UNet2DConditionModel

    assets = tmp_path_factory.mktemp("assets") / "digits_unet"
    torch.manual_seed(0)
    config = dict(image.base_unet_config(), block_out_channels=(8, 16, 16))
    UNet2DConditionModel(**config).save_pretrained(assets / "unet")
    monkeypatch_module.setattr(image, "ASSET_DIR", assets)
    return assets


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_build_image_demo_on_a_tiny_base(tmp_path: Path, tiny_base: Path) -> None:
    from datainf_core import data
    from datainf_core.gradients import DiffusionLossSettings, collect_gradients

    project = image.build_image_demo(
        tmp_path / "demo", train_per_style=2, test_per_style=1, epochs=1
    )
    assert project.task == "text-to-image"
    assert project.data.category_column == "category"
    config = json.loads((tmp_path / "demo" / "base" / diffusion.DEMO_CONFIG_FILE).read_text())
    assert config["text_encoder"] == "minilm"
    bundle = diffusion.load_diffusion(project, device="cpu")
    assert bundle.vae is None and bundle.image_size == image.IMAGE_SIZE
    trainable = [n for n, p in bundle.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(n.endswith("to_out.0.lora_A.default.weight") for n in trainable)
    df = data.load_split(project, "validation")
    examples = diffusion.build_image_examples(project, df, bundle)
    assert len(examples) == 3 and examples[0]["pixel_values"].shape == (1, 16, 16)
    settings = DiffusionLossSettings(
        noise_scheduler=bundle.noise_scheduler,
        timesteps=tuple(diffusion.default_timesteps(bundle.noise_scheduler)),
    )
    first = collect_gradients(bundle.unet, examples, task="text-to-image", diffusion=settings)
    second = collect_gradients(bundle.unet, examples, task="text-to-image", diffusion=settings)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    # A finished build is loaded, not trained again.
    again = image.build_image_demo(tmp_path / "demo")
    assert again.adapter_path == project.adapter_path


def test_stored_base_is_small() -> None:
    weights = image.ASSET_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.exists():
        pytest.skip("no stored base UNet (bench/make_image_base.py writes it)")
    assert weights.stat().st_size < 5_000_000
