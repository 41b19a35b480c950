"""Offline text-to-image demo: a tiny diffusion UNet on scikit-learn's digits, LoRA on three styles.

1. The base: a small ``UNet2DConditionModel`` (1 channel, 16 × 16 pixels, no VAE) conditioned on
   all-MiniLM-L6-v2 embeddings of captions such as "a handwritten digit seven", trained once on the
   plain (upsampled) digits by ``bench/make_image_base.py`` and stored in ``datainf_core/assets``
   (float16, under 5 MB). Without the stored weights it is trained on first use and cached.
2. The LoRA (r = 4 on to_q, to_k, to_v, to_out.0) is fine-tuned on digits drawn in three styles:
   plain, inverted (white background) and outlined (hollow strokes). Captions do not name the style,
   so identification has to come from the images themselves.
3. Train and test sets are imagefolder-style folders: PNG files plus ``metadata.jsonl`` with
   ``file_name``, ``caption``, ``category`` (the style) and ``digit``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from datainf_core import diffusion
from datainf_core.demos.generation import default_cache_dir

logger = logging.getLogger(__name__)

Progress = Callable[..., Any]

IMAGE_SIZE = 16
STYLES = ("plain", "inverted", "outlined")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_PER_STYLE = 200
TEST_PER_STYLE = 50
LORA_RANK = 4
LORA_EPOCHS = 15
LORA_LR = 2e-3
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits_unet"
BASE_STEPS = 100
BASE_MAX_SECONDS = 180.0


def caption_for(digit: int) -> str:
    """The caption of a digit image (style-free)."""
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


def load_digit_images(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits upsampled to ``size``: images ``n x size x size`` in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # n x 1 x 8 x 8
    large = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    return large[:, 0].clamp(0.0, 1.0).numpy(), digits.target.astype(np.int64)


def apply_style(images: np.ndarray, style: str) -> np.ndarray:
    """Draws images ``n x H x W`` in [0, 1] in one of :data:`STYLES`."""
    if style == "plain":
        return images
    if style == "inverted":
        return 1.0 - images
    if style == "outlined":
        x = torch.from_numpy(images)[:, None]  # n x 1 x H x W
        dilated = F.max_pool2d(x, 3, stride=1, padding=1)
        eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)
        return (dilated - eroded).clamp(0.0, 1.0)[:, 0].numpy()  # morphological gradient
    raise ValueError(f"style should be one of {STYLES}, got {style!r}")


def base_unet_config() -> dict[str, Any]:
    """Configuration of the demo's tiny UNet (about 2.0M parameters)."""
    return {
        "sample_size": IMAGE_SIZE,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 384,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def make_scheduler() -> Any:
    """The demo's DDPM noise scheduler (1,000 steps, cosine schedule)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def _encode_digit_captions() -> torch.Tensor:
    """MiniLM states of the ten captions, shape ``10 x DEMO_CAPTION_LENGTH x 384``."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    path = diffusion.minilm_path()
    bundle = diffusion.DiffusionBundle(
        unet=None,
        text_encoder=AutoModel.from_pretrained(path).eval(),
        tokenizer=AutoTokenizer.from_pretrained(path),
        noise_scheduler=None,
        caption_length=diffusion.DEMO_CAPTION_LENGTH,
    )
    return diffusion.encode_captions(bundle, [caption_for(d) for d in range(10)])


def train_image_base(
    out_dir: Path,
    *,
    steps: int = BASE_STEPS,
    max_seconds: float = BASE_MAX_SECONDS,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: Progress | None = None,
) -> Path:
    """Trains the base UNet on plain digits and saves it (float16) as ``out_dir/unet``.

    Stops after ``steps`` optimiser steps or ``max_seconds``, whichever comes first.
    """
    from diffusers import UNet2DConditionModel

    start = time.perf_counter()
    torch.manual_seed(seed)
    images, labels = load_digit_images()
    pixels = torch.from_numpy(images * 2.0 - 1.0)[:, None]  # n x 1 x H x W in [-1, 1]
    states = _encode_digit_captions()[torch.from_numpy(labels)]  # n x S x 384
    unet = UNet2DConditionModel(**base_unet_config())
    scheduler = make_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    unet.train()
    done = 0
    for done in range(1, steps + 1):
        rows = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        x0 = pixels[rows]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (batch_size,), generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        # Drop the caption 10% of the time (zeros), so the model also learns the unconditional case.
        keep = (torch.rand(batch_size, generator=generator) > 0.1).float()[:, None, None]
        prediction = unet(noisy, t, encoder_hidden_states=states[rows] * keep).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        if progress is not None:
            progress(done, steps, "training the base UNet")
        if done % 50 == 0:
            logger.info("base step %d: loss %.4f", done, float(loss))
        if time.perf_counter() - start > max_seconds:
            logger.warning("base training stopped by its time limit after %d steps", done)
            break
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.to(torch.float16).save_pretrained(tmp / "unet", safe_serialization=True)
    (tmp / "training.json").write_text(
        json.dumps({"steps": done, "seconds": round(time.perf_counter() - start, 1), "seed": seed})
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    logger.info(
        "trained the base UNet (%d steps) in %.2f seconds", done, time.perf_counter() - start
    )
    return out_dir


def ensure_image_base(target: Path, *, progress: Progress | None = None) -> Path:
    """Writes a base folder (demo layout) at ``target``: unet/, scheduler/, datainf_diffusion.json.

    The UNet comes from the stored asset, else from the cache, else it is trained now and cached.
    """
    source = ASSET_DIR
    if not (source / "unet" / "config.json").exists():
        source = default_cache_dir() / "digits_unet"
        if not (source / "unet" / "config.json").exists():
            logger.warning(
                "no stored base UNet in %s: training it now (about 3 minutes)", ASSET_DIR
            )
            train_image_base(source, progress=progress)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target / "unet", ignore_errors=True)
    shutil.copytree(source / "unet", target / "unet")
    make_scheduler().save_pretrained(target / "scheduler")
    (target / diffusion.DEMO_CONFIG_FILE).write_text(
        json.dumps(
            {"text_encoder": "minilm", "caption_length": diffusion.DEMO_CAPTION_LENGTH}, indent=2
        )
    )
    return target


def write_style_images(
    folder: Path, images: np.ndarray, digits: Sequence[int], styles: Sequence[str]
) -> pd.DataFrame:
    """Writes PNG files + ``metadata.jsonl`` (imagefolder layout); returns the table."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, digit, style) in enumerate(zip(images, digits, styles, strict=True)):
        name = f"{i:04d}_{style}_{int(digit)}.png"
        Image.fromarray(np.round(image * 255.0).astype(np.uint8), mode="L").save(folder / name)
        rows.append(
            {
                "file_name": name,
                "caption": caption_for(int(digit)),
                "category": style,
                "digit": int(digit),
            }
        )
    table = pd.DataFrame(rows)
    with open(folder / "metadata.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return table


def write_style_data(
    root: Path,
    *,
    seed: int = 0,
    train_per_style: int = TRAIN_PER_STYLE,
    test_per_style: int = TEST_PER_STYLE,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Draws digits, styles them and writes ``root/train`` and ``root/test``; returns both tables."""
    images, labels = load_digit_images()
    rng = np.random.default_rng(seed)
    per_style = train_per_style + test_per_style
    order = rng.permutation(len(images))[: per_style * len(STYLES)]
    tables = {}
    for split, lo, hi in (("train", 0, train_per_style), ("test", train_per_style, per_style)):
        # Rows of this split, style by style: per_style consecutive draws per style.
        picked = np.concatenate(
            [order[s * per_style + lo : s * per_style + hi] for s in range(len(STYLES))]
        )
        styles = [style for style in STYLES for _ in range(hi - lo)]
        styled = np.concatenate(
            [
                apply_style(images[picked[s * (hi - lo) : (s + 1) * (hi - lo)]], style)
                for s, style in enumerate(STYLES)
            ]
        )
        shuffle = rng.permutation(len(picked)) if split == "train" else np.arange(len(picked))
        tables[split] = write_style_images(
            Path(root) / split,
            styled[shuffle],
            labels[picked][shuffle].tolist(),
            [styles[i] for i in shuffle],
        )
    return tables["train"], tables["test"]


def build_image_demo(
    root: Path | str,
    *,
    seed: int = 0,
    progress: Progress | None = None,
    train_per_style: int = TRAIN_PER_STYLE,
    test_per_style: int = TEST_PER_STYLE,
    epochs: int = LORA_EPOCHS,
) -> Any:
    """Builds the image demo project in ``root`` (cached: a finished build is loaded, not redone).

    Args:
        root: Project folder (created).
        seed: Seed of the digit draw and of LoRA training.
        progress: ``progress(done, total, stage)``.
        train_per_style: Training images per style (600 in all by default).
        test_per_style: Test images per style (150 in all by default).
        epochs: LoRA fine-tuning epochs.

    Returns:
        The ``project.Project`` (task ``"text-to-image"``, adapter trained).
    """
    from datainf_core.project import create_project, load_project

    root = Path(root)
    if (root / "project.toml").exists() and (
        root / "adapter" / diffusion.LORA_WEIGHT_FILE
    ).exists():
        return load_project(root)
    start = time.perf_counter()
    # 1. Data and base model.
    write_style_data(
        root / "data", seed=seed, train_per_style=train_per_style, test_per_style=test_per_style
    )
    ensure_image_base(root / "base", progress=progress)
    project = create_project(
        root,
        name="Digits in three styles (text-to-image demo)",
        task="text-to-image",
        base="base",
        adapter=None,
        train="data/train",
        validation="data/test",
        image_column="file_name",
        caption_column="caption",
        category_column="category",
        max_length=diffusion.DEMO_CAPTION_LENGTH,
    )
    # 2. LoRA fine-tuning on the styled digits.
    adapter_dir = train_style_lora(
        root / "base",
        root / "data",
        root / "adapter",
        seed=seed,
        epochs=epochs,
        progress=progress,
    )
    project.model.adapter = "adapter"
    project.save()
    logger.info("built the image demo in %s in %.2f seconds", root, time.perf_counter() - start)
    assert adapter_dir.exists()
    return project


def train_style_lora(
    base: Path,
    data_dir: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    epochs: int = LORA_EPOCHS,
    lr: float = LORA_LR,
    rank: int = LORA_RANK,
    progress: Progress | None = None,
) -> Path:
    """Fine-tunes the style LoRA on ``data_dir/train`` (validated on ``data_dir/test``)."""
    bundle = diffusion.load_diffusion_folder(base, None, device="cpu")
    train_df = pd.read_json(Path(data_dir) / "train" / "metadata.jsonl", lines=True)
    test_df = pd.read_json(Path(data_dir) / "test" / "metadata.jsonl", lines=True)
    train_examples = diffusion.examples_from_table(
        train_df, bundle, base_dir=Path(data_dir) / "train"
    )
    test_examples = diffusion.examples_from_table(test_df, bundle, base_dir=Path(data_dir) / "test")
    history = diffusion.fit_unet_lora(
        bundle,
        train_examples,
        val_examples=test_examples,
        rank=rank,
        epochs=epochs,
        lr=lr,
        batch_size=32,
        seed=seed,
        progress=progress,
    )
    diffusion.save_unet_lora(bundle.unet, out_dir)
    (Path(out_dir) / "history.json").write_text(json.dumps(history, indent=2))
    return Path(out_dir)
