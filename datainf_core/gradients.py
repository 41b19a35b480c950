"""Per-sample gradients of the training loss for every trainable adapter tensor.

The result is the *gradient mapping* of ARCHITECTURE.md: block name (the parameter name, as in
``model.named_parameters()``) → per-sample gradients of shape ``n x d_block`` in float32.

Two routes compute it:

- ``"hooks"`` (default when it applies): one ordinary batched forward; forward hooks on the
  ``nn.Linear`` layers that own the adapter tensors (``lora_A``, ``lora_B``, a Linear head in
  ``modules_to_save``) keep each layer's input ``x`` and output ``y``; one
  ``torch.autograd.grad`` of the summed per-sample losses with respect to every ``y`` gives
  ``dL/dy``, and the per-sample weight gradient is ``Σ_t dL_b/dy[b, t] ⊗ x[b, t]``. This costs
  one forward plus (at most) one backward per mini-batch, close to plain training.
- ``"loop"``: a batch-of-one loop (forward, ``autograd.grad``), for adapter tensors that do not
  sit in an ``nn.Linear`` (DoRA magnitudes, embedding heads, convolution LoRA) and as the
  reference the batched route is tested against.

Losses per task (each one per sample, so gradients of the sum are per-sample gradients):

- ``"classification"``: cross-entropy of the logits on the given label (possibly wrong).
- ``"generation"``: mean token cross-entropy over tokens whose label is not ``-100`` (labels
  shifted by one as in Hugging Face causal LMs); ``data.py`` decides which tokens count.
- ``"text-to-image"``: noise-prediction MSE of a ``UNet2DConditionModel`` at fixed timesteps,
  with noise drawn from a ``torch.Generator`` seeded by the example's ``seed``; summed (or
  averaged) over the timesteps (see :class:`DiffusionLossSettings`).
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from datainf_core.batching import IGNORE_INDEX, collate_examples
from datainf_core.device import resolve_device
from datainf_core.errors import DataInfError, ModelError
from datainf_core.models import causal_lm_logits

logger = logging.getLogger(__name__)

TASKS = ("classification", "generation", "text-to-image")
METHODS = ("auto", "hooks", "loop")
DEFAULT_TIMESTEPS = (25, 205, 385, 565, 745, 925)

Example = dict[str, Any]
Progress = Callable[[int, int], None]


class GradientSettingsError(DataInfError, ValueError):
    """A setting of gradient collection (task, method, batch size, timesteps) is invalid."""


@dataclass
class DiffusionLossSettings:
    """How the text-to-image training loss is formed for one sample.

    Attributes:
        noise_scheduler: A diffusers scheduler (``DDPMScheduler`` or similar) with ``add_noise``
            and ``config.prediction_type`` (``"epsilon"``, ``"v_prediction"`` or ``"sample"``).
        vae: Optional ``AutoencoderKL``; when given, the UNet input is
            ``vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor``, otherwise the
            pixels themselves.
        timesteps: The fixed timesteps at which the loss is evaluated (the paper used six from 25
            to 925).
        reduction: ``"sum"`` or ``"mean"`` of the per-timestep losses.
        noise: ``"shared"``: every sample is noised with the same draws (seeded by
            ``noise_seed``), so two samples' gradients differ only through their images and
            captions; ``"per_sample"``: each sample's own draws (seeded by its ``seed``).
        noise_seed: Seed of the shared draws.
    """

    noise_scheduler: Any
    vae: Any = None
    timesteps: tuple[int, ...] = field(default=DEFAULT_TIMESTEPS)
    reduction: str = "sum"
    noise: str = "shared"
    noise_seed: int = 0

    def __post_init__(self) -> None:
        self.timesteps = tuple(int(t) for t in self.timesteps)
        if self.reduction not in ("sum", "mean"):
            raise GradientSettingsError(
                f"diffusion reduction should be 'sum' or 'mean', got {self.reduction!r}; "
                "pass one of those"
            )
        if self.noise not in ("shared", "per_sample"):
            raise GradientSettingsError(
                f"diffusion noise should be 'shared' or 'per_sample', got {self.noise!r}; "
                "pass one of those"
            )
        if not self.timesteps:
            raise GradientSettingsError(
                "diffusion timesteps is empty; pass at least one timestep, e.g. (25, 205, 385)"
            )
        limit = int(getattr(self.noise_scheduler.config, "num_train_timesteps", 1000))
        bad = [t for t in self.timesteps if not 0 <= t < limit]
        if bad:
            raise GradientSettingsError(
                f"diffusion timesteps {bad} are outside the scheduler's range [0, {limit}); "
                "pass timesteps inside it"
            )

    def describe(self) -> dict[str, Any]:
        """The settings as JSON-ready values (for store keys and run folders)."""
        config = dict(getattr(self.noise_scheduler, "config", {}))
        scheduler = {k: v for k, v in config.items() if isinstance(v, str | int | float | bool)}
        return {
            "scheduler": type(self.noise_scheduler).__name__,
            "scheduler_config": scheduler,
            "vae": None if self.vae is None else type(self.vae).__name__,
            "timesteps": list(self.timesteps),
            "reduction": self.reduction,
            "noise": self.noise,
            "noise_seed": self.noise_seed if self.noise == "shared" else None,
        }


# --------------------------------------------------------------------------------------------
# Adapter parameters
# --------------------------------------------------------------------------------------------


def _matches(name: str, pattern: str) -> bool:
    if fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return False


def adapter_parameters(
    model: nn.Module, include: Sequence[str] | None = None
) -> dict[str, nn.Parameter]:
    """The trainable adapter tensors of a model, in ``model.named_parameters()`` order.

    Trainable means ``requires_grad``: for a PEFT model these are the ``lora_A``/``lora_B``
    tensors and the ``modules_to_save`` copies; nothing is recognised by hard-coded names.

    Args:
        model: A PEFT-adapted model (``PeftModel``, or a diffusers model after ``add_adapter``).
        include: Optional name patterns (``fnmatch`` globs like ``"*.query.*"`` or regular
            expressions like ``"layer\\.[01]\\."``); a tensor is kept when any pattern matches.

    Returns:
        Parameter name → parameter.

    Raises:
        ModelError: The model has no trainable tensor, or no trainable tensor matches ``include``.
    """
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ModelError(
            f"model {type(model).__name__} has no trainable parameters; load the adapter with "
            "is_trainable=True (or call requires_grad_(True) on the adapter tensors)"
        )
    if include is None:
        return trainable
    if isinstance(include, str):
        include = [include]
    patterns = list(include)
    chosen = {n: p for n, p in trainable.items() if any(_matches(n, pat) for pat in patterns)}
    if not chosen:
        example = next(iter(trainable))
        raise ModelError(
            f"include patterns {patterns} match none of the {len(trainable)} trainable tensors "
            f"(e.g. {example!r}); pass patterns that match their names, or include=None for all"
        )
    return chosen


# --------------------------------------------------------------------------------------------
# Per-sample losses, one forward pass at a time
# --------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses and gradient products run in float32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


def _pad_token_id(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None) if config is not None else None
    return int(pad) if isinstance(pad, int) and pad >= 0 else 0


def _text_loss_terms(
    model: nn.Module, examples: Sequence[Example], task: str, device: torch.device
) -> Iterator[torch.Tensor]:
    """Yields the per-sample losses (``batch_size``,) of one text mini-batch (one forward)."""
    batch = collate_examples(
        [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples],
        pad_token_id=_pad_token_id(model),
        padding_side="right",
    )
    input_ids = batch["input_ids"].to(device)  # batch_size x T
    attention_mask = batch["attention_mask"].to(device)  # batch_size x T
    labels = batch["labels"].to(device)
    if task == "classification":
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = logits.to(_compute_dtype(logits.dtype))  # float32 at least, float64 stays
        # logits: batch_size x num_labels, labels: batch_size
        yield F.cross_entropy(logits, labels, reduction="none")
        return
    # Causal LM: position t predicts token t + 1; only positions with a target get logits.
    shift_logits, shift_labels = causal_lm_logits(
        model, input_ids, attention_mask, labels, ignore_index=IGNORE_INDEX
    )  # batch_size x K x vocab, batch_size x K
    shift_logits = shift_logits.to(_compute_dtype(shift_logits.dtype))
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),  # (batch_size * (T-1)) x vocab
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)  # batch_size x (T-1), 0 where ignored
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)  # batch_size
    yield token_loss.sum(dim=1) / counts.clamp(min=1)


def _sample_noise(seed: int, shape: Sequence[int], count: int) -> torch.Tensor:
    """Fixed noise of one sample: ``count x *shape`` float32 from a generator seeded by ``seed``."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((count, *shape), generator=generator, dtype=torch.float32)


def _diffusion_loss_terms(
    model: nn.Module,
    examples: Sequence[Example],
    settings: DiffusionLossSettings,
    device: torch.device,
) -> Iterator[torch.Tensor]:
    """Yields per-sample noise-prediction losses (``batch_size``), one UNet forward per timestep."""
    dtype = _model_dtype(model)
    compute = _compute_dtype(dtype)
    keys = ("pixel_values", "encoder_hidden_states", "seed")
    batch = collate_examples([{key: e[key] for key in keys} for e in examples])
    pixels = batch["pixel_values"].to(device)  # batch_size x C x H x W
    context = batch["encoder_hidden_states"].to(device=device, dtype=dtype)  # batch_size x S x D
    with torch.no_grad():
        if settings.vae is not None:
            vae = settings.vae
            latent_dist = vae.encode(pixels.to(_model_dtype(vae))).latent_dist
            latents = latent_dist.mean.to(compute) * float(vae.config.scaling_factor)
        else:
            latents = pixels.to(compute)  # batch_size x C x h x w
    count = len(settings.timesteps)
    if settings.noise == "shared":  # the same draws for every sample
        shared = _sample_noise(
            settings.noise_seed, latents.shape[1:], count
        )  # timesteps x C x h x w
        noise = shared[:, None].expand(-1, latents.shape[0], *([-1] * (latents.dim() - 1)))
    else:
        noise = torch.stack(
            [_sample_noise(int(seed), latents.shape[1:], count) for seed in batch["seed"]], dim=1
        )
    noise = noise.to(device=device, dtype=compute)  # timesteps x batch_size x C x h x w
    scheduler = settings.noise_scheduler
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    weight = 1.0 / count if settings.reduction == "mean" else 1.0
    for index, step in enumerate(settings.timesteps):
        timesteps = torch.full((latents.shape[0],), step, dtype=torch.long, device=device)
        eps = noise[index]  # batch_size x C x h x w
        noisy = scheduler.add_noise(latents, eps, timesteps)
        if prediction_type == "epsilon":
            target = eps
        elif prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, eps, timesteps)
        elif prediction_type == "sample":
            target = latents
        else:
            raise GradientSettingsError(
                f"scheduler prediction_type {prediction_type!r} is not supported; "
                "use 'epsilon', 'v_prediction' or 'sample'"
            )
        prediction = model(noisy.to(dtype), timesteps, encoder_hidden_states=context).sample
        error = F.mse_loss(prediction.to(compute), target.to(compute), reduction="none")
        yield weight * error.flatten(1).mean(dim=1)  # batch_size


def _loss_terms(
    model: nn.Module,
    examples: Sequence[Example],
    task: str,
    diffusion: DiffusionLossSettings | None,
    device: torch.device,
) -> Iterator[torch.Tensor]:
    if task == "text-to-image":
        assert diffusion is not None
        return _diffusion_loss_terms(model, examples, diffusion, device)
    return _text_loss_terms(model, examples, task, device)


def _check_task(task: str, diffusion: DiffusionLossSettings | None, batch_size: int) -> None:
    if task not in TASKS:
        raise GradientSettingsError(
            f"task should be one of {TASKS}, got {task!r}; pass one of those"
        )
    if task == "text-to-image" and diffusion is None:
        raise GradientSettingsError(
            "task 'text-to-image' needs diffusion=DiffusionLossSettings(noise_scheduler=...); "
            "pass the scheduler (and the VAE if the model has one)"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GradientSettingsError(
            f"batch_size should be a positive integer, got {batch_size!r}; pass e.g. 16"
        )


def _check_examples(examples: Sequence[Example], task: str) -> None:
    if len(examples) == 0:
        raise GradientSettingsError(
            "examples is empty; pass at least one example (see ARCHITECTURE.md 'Examples')"
        )
    needed = (
        ("pixel_values", "encoder_hidden_states", "seed")
        if task == "text-to-image"
        else ("input_ids", "labels")
    )
    missing = [key for key in needed if key not in examples[0]]
    if missing:
        raise GradientSettingsError(
            f"examples for task {task!r} lack keys {missing} (have {sorted(examples[0])}); "
            "build them with data.build_examples / diffusion.build_image_examples"
        )


# --------------------------------------------------------------------------------------------
# Batched route: hooks on the Linear layers that own the adapter tensors
# --------------------------------------------------------------------------------------------


@dataclass
class _HookedLinear:
    """One ``nn.Linear`` whose weight and/or bias is a requested block."""

    module: nn.Linear
    weight_name: str | None
    bias_name: str | None
    calls: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _plan_hooks(model: nn.Module, params: dict[str, nn.Parameter]) -> list[_HookedLinear] | None:
    """Maps each requested tensor to the Linear owning it; ``None`` when one has no such owner."""
    by_id = {id(p): name for name, p in params.items()}
    covered: set[str] = set()
    plan: list[_HookedLinear] = []
    for module in model.modules():
        owned = [by_id[id(p)] for p in module.parameters(recurse=False) if id(p) in by_id]
        if type(module) is not nn.Linear:
            if owned:  # e.g. an embedding adapter, a DoRA magnitude, a tied embedding weight
                logger.info("Batched hooks cannot serve %s (in a %s)", owned[0], type(module))
                return None
            continue
        weight_name = by_id.get(id(module.weight))
        bias_name = by_id.get(id(module.bias)) if module.bias is not None else None
        if weight_name is None and bias_name is None:
            continue
        plan.append(_HookedLinear(module, weight_name, bias_name))
        covered.update(n for n in (weight_name, bias_name) if n is not None)
    missing = [name for name in params if name not in covered]
    if missing:
        logger.info("Batched hooks do not cover %d tensors (e.g. %s)", len(missing), missing[0])
        return None
    return plan


def _collect_hooks(
    model: nn.Module,
    examples: Sequence[Example],
    params: dict[str, nn.Parameter],
    plan: list[_HookedLinear],
    *,
    task: str,
    diffusion: DiffusionLossSettings | None,
    batch_size: int,
    device: torch.device,
    progress: Progress | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    n = len(examples)
    grads = {name: torch.zeros((n, p.numel()), dtype=torch.float32) for name, p in params.items()}
    losses = torch.zeros(n, dtype=torch.float64)

    def make_hook(entry: _HookedLinear) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            entry.calls.append((args[0].detach(), output))

        return hook

    handles = [entry.module.register_forward_hook(make_hook(entry)) for entry in plan]
    called: set[int] = set()
    # Text batches are formed from samples of similar length (less padding); results go back to
    # the callers' order through ``index``.
    order = torch.arange(n)
    if task != "text-to-image":
        lengths = torch.tensor([int(e["input_ids"].shape[0]) for e in examples])
        order = torch.argsort(lengths, stable=True)
    try:
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]  # rows of this mini-batch
            chunk = [examples[int(i)] for i in index]
            rows = len(chunk)
            block_rows = {
                name: torch.zeros((rows, g.shape[1]), dtype=torch.float32, device=device)
                for name, g in grads.items()
            }
            for term in _loss_terms(model, chunk, task, diffusion, device):
                live = [
                    (entry, call) for entry in plan for call in entry.calls if call[1].requires_grad
                ]
                called.update(id(entry) for entry, _ in live)
                outputs = [call[1] for _, call in live]
                output_grads = (
                    torch.autograd.grad(term.sum(), outputs, allow_unused=True) if outputs else []
                )
                for (entry, (x, _)), g in zip(live, output_grads, strict=True):
                    if g is None:
                        continue
                    _accumulate_linear(entry, x, g, rows, block_rows)
                for entry in plan:
                    entry.calls.clear()
                losses[index] += term.detach().double().cpu()
            for name, value in block_rows.items():
                grads[name][index] = value.cpu()
            if progress is not None:
                progress(start + rows, n)
    finally:
        for handle in handles:
            handle.remove()
        for entry in plan:
            entry.calls.clear()
    unused = [e.weight_name or e.bias_name for e in plan if id(e) not in called]
    if unused:
        logger.warning(
            "%d adapter layers were never used in the forward pass (merged adapter or unused "
            "module?); their gradients are zero, e.g. %s",
            len(unused),
            unused[0],
        )
    return grads, losses.float()


def _accumulate_linear(
    entry: _HookedLinear,
    x: torch.Tensor,
    g: torch.Tensor,
    rows: int,
    block_rows: dict[str, torch.Tensor],
) -> None:
    """Adds one call's per-sample weight/bias gradients of a Linear layer to ``block_rows``."""
    if x.shape[0] != rows or g.shape[0] != rows:
        raise ModelError(
            f"layer input has leading dimension {x.shape[0]}, not the batch size {rows}; "
            "collect these gradients with method='loop'"
        )
    compute = _compute_dtype(x.dtype)
    x = x.reshape(rows, -1, x.shape[-1]).to(compute)  # batch_size x T x d_in
    g = g.reshape(rows, -1, g.shape[-1]).to(compute)  # batch_size x T x d_out
    if entry.weight_name is not None:
        weight = torch.bmm(g.transpose(1, 2), x)  # batch_size x d_out x d_in
        block_rows[entry.weight_name] += weight.reshape(rows, -1).float()
    if entry.bias_name is not None:
        block_rows[entry.bias_name] += g.sum(dim=1).float()  # batch_size x d_out


# --------------------------------------------------------------------------------------------
# Reference route: a batch-of-one loop
# --------------------------------------------------------------------------------------------


def _collect_loop(
    model: nn.Module,
    examples: Sequence[Example],
    params: dict[str, nn.Parameter],
    *,
    task: str,
    diffusion: DiffusionLossSettings | None,
    device: torch.device,
    progress: Progress | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    n = len(examples)
    names = list(params)
    tensors = list(params.values())
    grads = {name: torch.zeros((n, p.numel()), dtype=torch.float32) for name, p in params.items()}
    losses = torch.zeros(n, dtype=torch.float64)
    for index, example in enumerate(examples):
        for term in _loss_terms(model, [example], task, diffusion, device):
            found = torch.autograd.grad(term.sum(), tensors, allow_unused=True)
            for name, g in zip(names, found, strict=True):
                if g is not None:
                    grads[name][index] += g.reshape(-1).float().cpu()
            losses[index] += float(term.detach().double().sum())
        if progress is not None:
            progress(index + 1, n)
    return grads, losses.float()


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _prepare(
    model: nn.Module, diffusion: DiffusionLossSettings | None, device: str | torch.device
) -> torch.device:
    resolved = resolve_device(device)
    if _model_device(model) != resolved:
        logger.info("Moving the model to %s", resolved)
        model.to(resolved)
    if (
        diffusion is not None
        and diffusion.vae is not None
        and _model_device(diffusion.vae) != resolved
    ):
        diffusion.vae.to(resolved)
    return resolved


def collect_gradients_and_losses(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    task: str,
    include: Sequence[str] | None = None,
    batch_size: int = 16,
    device: str | torch.device = "auto",
    diffusion: DiffusionLossSettings | None = None,
    method: str = "auto",
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-sample adapter gradients and, as a by-product, per-sample training losses.

    Args:
        model: PEFT-adapted classifier, causal LM or ``UNet2DConditionModel``. Put in eval mode
            for the duration (its training flag is restored afterwards); it is moved to
            ``device`` when it is elsewhere. Parameters' ``.grad`` are left untouched.
        examples: ``n`` examples in the ARCHITECTURE.md format for ``task``.
        task: ``"classification"``, ``"generation"`` or ``"text-to-image"``.
        include: Optional name patterns restricting the blocks (see :func:`adapter_parameters`).
        batch_size: Samples per forward pass (the UNet sees this many per timestep).
        device: ``"auto"`` (CUDA, then MPS, then CPU) or a device.
        diffusion: Loss settings, required for ``"text-to-image"``.
        method: ``"auto"`` (batched hooks when every block sits in an ``nn.Linear``, else the
            loop), ``"hooks"`` or ``"loop"``.
        progress: Called as ``progress(done, total)`` after every mini-batch.

    Returns:
        ``(gradients, losses)``: block name → ``n x d_block`` float32 CPU tensor, in
        ``model.named_parameters()`` order; and the ``n`` per-sample losses, float32.

    Raises:
        GradientSettingsError: Bad task, batch size, method or examples.
        ModelError: No trainable tensor (or none matching ``include``).
    """
    _check_task(task, diffusion, batch_size)
    if method not in METHODS:
        raise GradientSettingsError(
            f"method should be one of {METHODS}, got {method!r}; pass 'auto' unless testing"
        )
    _check_examples(examples, task)
    params = adapter_parameters(model, include)
    resolved = _prepare(model, diffusion, device)
    plan = _plan_hooks(model, params) if method in ("auto", "hooks") else None
    if method == "hooks" and plan is None:
        raise ModelError(
            "method='hooks' needs every adapter tensor inside an nn.Linear, but some are not "
            "(DoRA, embedding or convolution adapters); pass method='auto' or 'loop'"
        )
    route = "hooks" if plan is not None else "loop"
    if method == "auto" and route == "loop":
        logger.warning("Falling back to the batch-of-one loop: some adapter tensors are not Linear")
    was_training = model.training
    model.eval()
    began = time.perf_counter()
    try:
        with torch.enable_grad():
            if plan is not None:
                grads, losses = _collect_hooks(
                    model,
                    examples,
                    params,
                    plan,
                    task=task,
                    diffusion=diffusion,
                    batch_size=batch_size,
                    device=resolved,
                    progress=progress,
                )
            else:
                grads, losses = _collect_loop(
                    model,
                    examples,
                    params,
                    task=task,
                    diffusion=diffusion,
                    device=resolved,
                    progress=progress,
                )
    finally:
        model.train(was_training)
    total = sum(g.shape[1] for g in grads.values())
    logger.info(
        "Collected %d x %d per-sample gradients in %d blocks (%s) in %.2f seconds",
        len(examples),
        total,
        len(grads),
        route,
        time.perf_counter() - began,
    )
    return grads, losses


def collect_gradients(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    task: str,
    include: Sequence[str] | None = None,
    batch_size: int = 16,
    device: str | torch.device = "auto",
    diffusion: DiffusionLossSettings | None = None,
    method: str = "auto",
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of the training loss for every trainable adapter tensor.

    See :func:`collect_gradients_and_losses` for the arguments.

    Returns:
        Block name → ``n x d_block`` float32 tensor (the ARCHITECTURE.md gradient mapping).
    """
    grads, _ = collect_gradients_and_losses(
        model,
        examples,
        task=task,
        include=include,
        batch_size=batch_size,
        device=device,
        diffusion=diffusion,
        method=method,
        progress=progress,
    )
    return grads


def per_sample_losses(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    task: str,
    batch_size: int = 16,
    device: str | torch.device = "auto",
    diffusion: DiffusionLossSettings | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """The training loss of every sample (the ``train_loss`` mislabel signal), forward only.

    Args:
        model: As in :func:`collect_gradients_and_losses`.
        examples: ``n`` examples for ``task``.
        task: ``"classification"``, ``"generation"`` or ``"text-to-image"``.
        batch_size: Samples per forward pass.
        device: ``"auto"`` or a device.
        diffusion: Loss settings, required for ``"text-to-image"``.
        progress: Called as ``progress(done, total)`` after every mini-batch.

    Returns:
        Float32 tensor of shape ``n``: the same loss :func:`collect_gradients` differentiates.
    """
    _check_task(task, diffusion, batch_size)
    _check_examples(examples, task)
    resolved = _prepare(model, diffusion, device)
    n = len(examples)
    losses = torch.zeros(n, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                chunk = examples[start : start + batch_size]
                for term in _loss_terms(model, chunk, task, diffusion, resolved):
                    losses[start : start + len(chunk)] += term.double().cpu()
                if progress is not None:
                    progress(start + len(chunk), n)
    finally:
        model.train(was_training)
    return losses.float()
