"""diffusion.py on tiny random models: SD folder layout + diffusers LoRA file, examples, fixed loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tolerances import ENGINE_ATOL, ENGINE_RTOL

from datainf_core import diffusion
from datainf_core.errors import DataError, ModelError

CROSS_DIM = 32


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins of bytes used by byte-level BPE (CLIP's vocabulary base)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def save_tiny_clip(folder: Path, seed: int = 0) -> None:
    """A 2-layer random CLIP text encoder and a character-level CLIP tokenizer (SD layout)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    tokenizer.save_pretrained(tok_dir)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=CROSS_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")


def tiny_unet(seed: int = 0, in_channels: int = 4, cross_dim: int = CROSS_DIM):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=4,
        norm_num_groups=4,
    )


def make_sd_folder(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny random Stable Diffusion folder + a diffusers LoRA file; returns (base, lora file)."""
    from diffusers import AutoencoderKL, DDPMScheduler

    base = root / "tiny-sd"
    tiny_unet(seed).save_pretrained(base / "unet")
    save_tiny_clip(base, seed)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(base / "scheduler")
    torch.manual_seed(seed)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
        sample_size=16,
    ).save_pretrained(base / "vae")
    (base / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDPMScheduler"],
                "vae": ["diffusers", "AutoencoderKL"],
            }
        )
    )
    # The LoRA, written the way diffusers' train_text_to_image_lora.py writes it.
    unet = tiny_unet(seed)
    diffusion.add_unet_lora(unet, rank=2, alpha=4, init_lora_weights="gaussian")
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    lora_file = diffusion.save_unet_lora(unet, root / "lora")
    return base, lora_file


def write_imagefolder(folder: Path, n: int, *, size: int = 16, mode: str = "RGB") -> pd.DataFrame:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(
            folder / f"img{i}.png"
        )
        rows.append({"file_name": f"img{i}.png", "caption": f"picture {i}", "category": i % 2})
    table = pd.DataFrame(rows)
    table.to_json(folder / "metadata.jsonl", orient="records", lines=True)
    return table


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_sd_folder(tmp_path_factory.mktemp("sd"))


def test_sd_folder_layout_loads_with_diffusers_lora(sd_folder: tuple[Path, Path]) -> None:
    base, lora_file = sd_folder
    keys = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(lora_file))
    assert all(k.startswith("unet.") for k in keys)  # the training scripts' key layout
    bundle = diffusion.load_diffusion_folder(base, lora_file, device="cpu")
    assert bundle.vae is not None and bundle.image_size == 16 and bundle.image_channels == 3
    trainable = [n for n, p in bundle.unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert not any(p.requires_grad for p in bundle.text_encoder.parameters())
    # The folder (not only the file) works too, and loads the same weights.
    again = diffusion.load_diffusion_folder(base, lora_file.parent, device="cpu")
    for (name, a), (_, b) in zip(
        bundle.unet.named_parameters(), again.unet.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def test_loaded_lora_reproduces_the_saved_model(tmp_path: Path) -> None:
    base, lora_file = make_sd_folder(tmp_path, seed=3)
    reference = tiny_unet(3)
    diffusion.add_unet_lora(reference, rank=2, alpha=4, init_lora_weights="gaussian")
    bundle = diffusion.load_diffusion_folder(base, lora_file, device="cpu")
    state = {k: v for k, v in bundle.unet.state_dict().items() if "lora_" in k}
    reference.load_state_dict(state, strict=False)
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 5, CROSS_DIM)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context).sample
        got = bundle.unet(x, t, encoder_hidden_states=context).sample
    # Same scaling (alpha / r = 2) survives the save → load round trip.
    torch.testing.assert_close(got, expected, rtol=ENGINE_RTOL, atol=ENGINE_ATOL)


def test_bad_folders_raise_one_line_errors(tmp_path: Path, sd_folder: tuple[Path, Path]) -> None:
    base, _ = sd_folder
    with pytest.raises(ModelError, match="no unet/ folder"):
        diffusion.load_diffusion_folder(tmp_path, None)
    empty = tmp_path / "empty_adapter"
    empty.mkdir()
    with pytest.raises(ModelError, match="pytorch_lora_weights"):
        diffusion.load_diffusion_folder(base, empty)


def test_image_examples_and_fixed_loss_reproduce(tmp_path: Path, sd_folder: tuple[Path, Path]):
    from datainf_core.batching import collate_examples
    from datainf_core.gradients import DiffusionLossSettings, collect_gradients

    base, lora_file = sd_folder
    bundle = diffusion.load_diffusion_folder(base, lora_file, device="cpu")
    table = write_imagefolder(tmp_path / "train", 4, size=20)
    examples = diffusion.examples_from_table(table, bundle, base_dir=tmp_path / "train")
    assert examples[0]["pixel_values"].shape == (3, 16, 16)  # resized to the model's size
    assert examples[0]["encoder_hidden_states"].shape == (bundle.caption_length, CROSS_DIM)
    assert all(float(e["pixel_values"].min()) >= -1.0 for e in examples)
    assert examples[1]["seed"] == diffusion.sample_seed("img1.png")
    timesteps = diffusion.default_timesteps(bundle.noise_scheduler)
    assert timesteps == [25, 205, 385, 565, 745, 925]
    # Each sample's own noise, as diffusion.denoising_loss (validation during training) draws it.
    settings = DiffusionLossSettings(
        noise_scheduler=bundle.noise_scheduler, vae=bundle.vae, noise="per_sample"
    )
    first = collect_gradients(bundle.unet, examples, task="text-to-image", diffusion=settings)
    second = collect_gradients(bundle.unet, examples, task="text-to-image", diffusion=settings)
    assert set(first) == {n for n, p in bundle.unet.named_parameters() if p.requires_grad}
    for name in first:
        assert torch.equal(first[name], second[name]), name
        assert float(first[name].abs().sum()) > 0.0
    # diffusion.denoising_loss (used for validation) is the loss the gradients are taken of.
    with torch.no_grad():
        mine = diffusion.denoising_loss(bundle, collate_examples(examples))
    from datainf_core.gradients import per_sample_losses

    theirs = per_sample_losses(bundle.unet, examples, task="text-to-image", diffusion=settings)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_denoising_loss_matches_float64_formula(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler

    unet = tiny_unet(1, in_channels=1, cross_dim=8).double()
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    bundle = diffusion.DiffusionBundle(unet, None, None, scheduler, caption_length=3)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    context = torch.randn(3, 3, 8, dtype=torch.float64)
    seeds = [5, 17, 5]
    steps = [3, 50, 97]
    got = diffusion.denoising_loss(
        bundle,
        {"pixel_values": x, "encoder_hidden_states": context, "seed": torch.tensor(seeds)},
        timesteps=steps,
    )
    alpha_bar = scheduler.alphas_cumprod.double()
    expected = torch.zeros(3, dtype=torch.float64)
    for i in range(3):
        noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(seeds[i]))
        for k, t in enumerate(steps):
            eps = noise[k].double()
            noisy = alpha_bar[t].sqrt() * x[i] + (1 - alpha_bar[t]).sqrt() * eps
            pred = unet(noisy[None], torch.tensor([t]), encoder_hidden_states=context[i : i + 1])
            expected[i] += ((pred.sample[0] - eps) ** 2).mean()
    torch.testing.assert_close(got.double(), expected, rtol=ENGINE_RTOL, atol=ENGINE_ATOL)
    assert float(got[0]) != float(got[2])  # same seed, different image


def test_missing_image_raises_data_error(tmp_path: Path, sd_folder: tuple[Path, Path]) -> None:
    base, _ = sd_folder
    bundle = diffusion.load_diffusion_folder(base, None, device="cpu")
    table = pd.DataFrame({"file_name": ["nope.png"], "caption": ["x"]})
    with pytest.raises(DataError, match="nope.png"):
        diffusion.examples_from_table(table, bundle, base_dir=tmp_path)
    with pytest.raises(DataError, match="caption_column"):
        diffusion.examples_from_table(table[["file_name"]], bundle, base_dir=tmp_path)


def test_demo_layout_project_trains_and_loads(tmp_path: Path) -> None:
    """A demo-layout base (unet/ + scheduler/ + datainf_diffusion.json, no VAE) through a project."""
    from diffusers import DDPMScheduler

    from datainf_core.project import create_project

    base = tmp_path / "base"
    tiny_unet(0, in_channels=1, cross_dim=384).save_pretrained(base / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(base / "scheduler")
    (base / diffusion.DEMO_CONFIG_FILE).write_text(json.dumps({"text_encoder": "minilm"}))
    write_imagefolder(tmp_path / "train", 6, size=8, mode="L")
    write_imagefolder(tmp_path / "test", 2, size=8, mode="L")
    project = create_project(
        tmp_path,
        task="text-to-image",
        base=str(base),
        train=str(tmp_path / "train"),
        validation=str(tmp_path / "test"),
        image_column="file_name",
        caption_column="caption",
        category_column="category",
        max_length=8,
    )

    class Settings:
        epochs, rank, alpha, lr, batch_size, seed, target_modules = 1, 2, 2, 1e-3, 4, 0, None

    result = diffusion.train_unet_lora(project, Settings())
    assert (result.adapter_path / diffusion.LORA_WEIGHT_FILE).exists()
    assert project.adapter_path == result.adapter_path.resolve()
    bundle = diffusion.load_diffusion(project, device="cpu")
    assert bundle.vae is None and bundle.caption_length == 8 and bundle.image_channels == 1
    from datainf_core import data

    examples = diffusion.build_image_examples(project, data.load_split(project, "train"), bundle)
    assert len(examples) == 6 and examples[0]["pixel_values"].shape == (1, 8, 8)
    assert examples[0]["encoder_hidden_states"].shape == (8, 384)

    # The project's diffusion_noise reaches the run, and each setting keeps its own gradients.
    from datainf_core import runs

    scores = {}
    for noise in ("shared", "per_sample"):
        project.influence.diffusion_noise = noise
        folder = runs.execute_run(project, runs.RunSettings(methods=["datainf"], device="cpu"))
        scores[noise] = pd.read_parquet(folder / "scores.parquet")["score"].to_numpy()
    assert len([p for p in (project.gradients_dir / "train").iterdir() if p.is_dir()]) == 2
    assert not np.allclose(scores["shared"], scores["per_sample"])
