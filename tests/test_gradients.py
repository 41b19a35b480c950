"""Batched per-sample adapter gradients equal a plain batch-of-one loop (forward, backward, .grad).

Tiny random models built from configs: a BERT classifier, a Llama causal LM (padded batches of
mixed lengths), a UNet2DConditionModel with LoRA on to_q/to_k/to_v/to_out.0. LoRA A is gaussian
and LoRA B is randomised too (peft zeroes B even with the gaussian init, which would make every
lora_A gradient zero and the comparison blind to it).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, TaskType, get_peft_model
from tolerances import GRAD_ATOL, GRAD_RTOL

from datainf_core.errors import DataInfError, ModelError
from datainf_core.gradients import (
    DiffusionLossSettings,
    GradientSettingsError,
    adapter_parameters,
    collect_gradients,
    collect_gradients_and_losses,
    per_sample_losses,
)

VOCAB = 50


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core machine: one thread avoids oversubscription stalls.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomise_lora_b(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def tiny_classifier(seed: int = 0, num_labels: int = 3) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.2,  # dropout on: the collection must switch it off (eval mode)
        attention_probs_dropout_prob=0.2,
    )
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=4,
        lora_alpha=8,
        lora_dropout=0.2,
        target_modules=["query", "value"],
        init_lora_weights="gaussian",
    )
    model = get_peft_model(BertForSequenceClassification(config), lora)
    _randomise_lora_b(model, seed)
    return model


def tiny_causal_lm(seed: int = 0, targets: tuple[str, ...] = ("q_proj", "v_proj")):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=4,
        lora_alpha=8,
        target_modules=list(targets),
        init_lora_weights="gaussian",
    )
    model = get_peft_model(LlamaForCausalLM(config), lora)
    _randomise_lora_b(model, seed)
    return model


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    unet.add_adapter(
        LoraConfig(
            r=2,
            lora_alpha=2,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights="gaussian",
        )
    )
    _randomise_lora_b(unet, seed)
    return unet


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
        sample_size=16,
    )


def classification_examples(n: int, seed: int, num_labels: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(3, 14, (), generator=generator))
        examples.append(
            {
                "input_ids": torch.randint(1, VOCAB, (length,), generator=generator),
                "labels": torch.randint(0, num_labels, (), generator=generator),
            }
        )
    return examples


def generation_examples(n: int, seed: int) -> list[dict]:
    """Mixed lengths; the first part of each sample (the prompt) is masked with -100."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(4, 17, (), generator=generator))
        ids = torch.randint(1, VOCAB, (length,), generator=generator)
        labels = ids.clone()
        labels[: int(torch.randint(1, length - 1, (), generator=generator))] = -100
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def image_examples(n: int, seed: int, *, size: int, channels: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.rand((channels, size, size), generator=generator) * 2 - 1,
            "encoder_hidden_states": torch.randn((5, 12), generator=generator),
            "seed": 1000 * seed + i,
        }
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------
# The plain reference: one sample at a time, loss.backward(), read .grad
# ---------------------------------------------------------------------------------------------


def reference_loss(model, example, task, diffusion=None):
    if task == "classification":
        logits = model(input_ids=example["input_ids"][None]).logits
        return F.cross_entropy(logits, example["labels"][None])
    if task == "generation":
        logits = model(input_ids=example["input_ids"][None]).logits[0]
        return F.cross_entropy(logits[:-1], example["labels"][1:], ignore_index=-100)
    dtype = next(model.parameters()).dtype
    pixels = example["pixel_values"][None].to(dtype)
    if diffusion.vae is not None:
        latents = diffusion.vae.encode(pixels).latent_dist.mean
        latents = latents * diffusion.vae.config.scaling_factor
    else:
        latents = pixels
    steps = diffusion.timesteps
    generator = torch.Generator().manual_seed(example["seed"])
    noise = torch.randn((len(steps), *latents.shape[1:]), generator=generator).to(dtype)
    total = 0.0
    for k, step in enumerate(steps):
        t = torch.tensor([step])
        noisy = diffusion.noise_scheduler.add_noise(latents, noise[k : k + 1], t)
        context = example["encoder_hidden_states"][None].to(dtype)
        prediction = model(noisy, t, encoder_hidden_states=context).sample
        total = total + F.mse_loss(prediction, noise[k : k + 1])
    return total if diffusion.reduction == "sum" else total / len(steps)


def reference_gradients(model, examples, task, diffusion=None):
    model.eval()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    losses = []
    for example in examples:
        model.zero_grad(set_to_none=True)
        loss = reference_loss(model, example, task, diffusion)
        loss.backward()
        losses.append(float(loss.detach()))
        for name in names:
            grad = params[name].grad
            rows[name].append(torch.zeros(params[name].numel()) if grad is None else grad.flatten())
    model.zero_grad(set_to_none=True)
    return {name: torch.stack(r) for name, r in rows.items()}, torch.tensor(losses)


def assert_same_gradients(batched, reference):
    assert list(batched) == list(reference)
    for name, expected in reference.items():
        got = batched[name]
        assert got.dtype == torch.float32
        assert got.shape == expected.shape, name
        torch.testing.assert_close(
            got.double(), expected.double(), rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name
        )


def _as_dtype(model, dtype):
    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)


# ---------------------------------------------------------------------------------------------
# Equivalence with the loop
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_classifier_batched_equals_loop(seed, dtype):
    model = _as_dtype(tiny_classifier(seed), dtype)
    examples = classification_examples(9, seed + 10)
    grads, losses = collect_gradients_and_losses(
        model, examples, task="classification", batch_size=4, device="cpu"
    )
    expected, expected_losses = reference_gradients(model, examples, "classification")
    assert_same_gradients(grads, expected)
    torch.testing.assert_close(losses.double(), expected_losses.double(), rtol=1e-5, atol=1e-6)
    a_block = next(name for name in grads if "lora_A" in name)
    assert grads[a_block].abs().sum() > 0  # B is not zero, so A has gradients
    assert any("modules_to_save" in name for name in grads)  # the classifier head is a block


def test_causal_lm_long_masked_prompts_equal_loop():
    """Every prompt masked for 3+ tokens: the output layer skips those positions (logits_to_keep)."""
    model = tiny_causal_lm(1)
    examples = generation_examples(7, seed=5)
    for example in examples:
        example["labels"][:3] = -100
    grads, losses = collect_gradients_and_losses(
        model, examples, task="generation", batch_size=3, device="cpu"
    )
    expected, expected_losses = reference_gradients(model, examples, "generation")
    assert_same_gradients(grads, expected)
    torch.testing.assert_close(losses.double(), expected_losses.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_causal_lm_padded_mixed_lengths_equals_loop(dtype):
    model = _as_dtype(tiny_causal_lm(0), dtype)
    examples = generation_examples(11, seed=3)
    assert len({len(e["input_ids"]) for e in examples}) > 3
    grads = collect_gradients(model, examples, task="generation", batch_size=5, device="cpu")
    expected, _ = reference_gradients(model, examples, "generation")
    assert_same_gradients(grads, expected)


@pytest.mark.parametrize("with_vae,reduction", [(True, "sum"), (False, "mean")])
def test_unet_batched_equals_loop(with_vae, reduction):
    from diffusers import DDPMScheduler

    unet = tiny_unet(0)
    vae = tiny_vae(1) if with_vae else None
    settings = DiffusionLossSettings(
        noise_scheduler=DDPMScheduler(num_train_timesteps=1000),
        vae=vae,
        timesteps=(25, 385, 925),
        reduction=reduction,
        noise="per_sample",
    )
    size, channels = (16, 3) if with_vae else (8, 4)
    examples = image_examples(5, seed=2, size=size, channels=channels)
    grads, losses = collect_gradients_and_losses(
        unet, examples, task="text-to-image", diffusion=settings, batch_size=3, device="cpu"
    )
    expected, expected_losses = reference_gradients(unet, examples, "text-to-image", settings)
    assert_same_gradients(grads, expected)
    torch.testing.assert_close(losses.double(), expected_losses.double(), rtol=1e-5, atol=1e-6)
    assert all("lora_A" in name or "lora_B" in name for name in grads)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in grads} == {
        "to_q",
        "to_k",
        "to_v",
        "0",  # to_out.0
    }


def test_unet_shared_noise_equals_loop_with_one_seed():
    """Shared noise: the loop with every sample's seed set to noise_seed; same image, same row."""
    from diffusers import DDPMScheduler

    unet = tiny_unet(2)
    settings = DiffusionLossSettings(
        noise_scheduler=DDPMScheduler(num_train_timesteps=1000),
        timesteps=(25, 565),
        noise="shared",
        noise_seed=7,
    )
    examples = image_examples(4, seed=4, size=8, channels=4)
    examples.append({**examples[1], "seed": 999})  # sample 1 again, under another seed
    grads, losses = collect_gradients_and_losses(
        unet, examples, task="text-to-image", diffusion=settings, batch_size=3, device="cpu"
    )
    reseeded = [{**e, "seed": 7} for e in examples]
    expected, expected_losses = reference_gradients(unet, reseeded, "text-to-image", settings)
    assert_same_gradients(grads, expected)
    torch.testing.assert_close(losses.double(), expected_losses.double(), rtol=1e-5, atol=1e-6)
    for name, rows in grads.items():
        torch.testing.assert_close(rows[4], rows[1], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)
    assert settings.describe()["noise"] == "shared" and settings.describe()["noise_seed"] == 7


def test_non_linear_adapter_falls_back_to_loop():
    # LoRA on the embedding: lora_embedding_A/B are not nn.Linear weights, so hooks cannot serve.
    model = tiny_causal_lm(1, targets=("q_proj", "embed_tokens"))
    examples = generation_examples(4, seed=5)
    grads = collect_gradients(model, examples, task="generation", device="cpu")
    expected, _ = reference_gradients(model, examples, "generation")
    assert_same_gradients(grads, expected)
    with pytest.raises(ModelError, match="method='hooks'"):
        collect_gradients(model, examples, task="generation", device="cpu", method="hooks")


# ---------------------------------------------------------------------------------------------
# Blocks, side effects, determinism
# ---------------------------------------------------------------------------------------------


def test_only_adapter_tensors_and_no_side_effects():
    model = tiny_classifier(0)
    model.train()
    examples = classification_examples(5, seed=1)
    grads = collect_gradients(model, examples, task="classification", batch_size=2, device="cpu")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert list(grads) == trainable  # named_parameters order, nothing frozen
    assert all(("lora_" in name) or ("modules_to_save" in name) for name in grads)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched
    assert model.training  # training flag restored
    for name, p in model.named_parameters():
        if name in grads:
            assert grads[name].shape == (5, p.numel())
    again = collect_gradients(model, examples, task="classification", batch_size=3, device="cpu")
    for name in grads:
        assert torch.equal(grads[name], again[name]) or torch.allclose(
            grads[name], again[name], rtol=GRAD_RTOL, atol=GRAD_ATOL
        )
    third = collect_gradients(model, examples, task="classification", batch_size=2, device="cpu")
    assert all(torch.equal(grads[name], third[name]) for name in grads)  # deterministic


def test_include_patterns():
    model = tiny_classifier(0)
    everything = adapter_parameters(model)
    glob = adapter_parameters(model, ["*layer.0*.query.lora_A*"])
    assert list(glob) == [n for n in everything if "layer.0." in n and "query.lora_A" in n]
    regex = adapter_parameters(model, [r"layer\.1\..*value"])
    assert regex and all("layer.1." in n and "value" in n for n in regex)
    with pytest.raises(ModelError, match="match none"):
        adapter_parameters(model, ["no_such_module"])
    examples = classification_examples(3, seed=4)
    some = collect_gradients(
        model, examples, task="classification", include=["*classifier*"], device="cpu"
    )
    assert list(some) == [n for n in everything if "classifier" in n]
    full = collect_gradients(model, examples, task="classification", device="cpu")
    for name in some:
        torch.testing.assert_close(some[name], full[name], rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_frozen_model_is_a_user_error():
    model = tiny_classifier(0)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ModelError, match="no trainable parameters"):
        collect_gradients(model, classification_examples(2, 0), task="classification")


def test_per_sample_losses_match_collection():
    model = tiny_causal_lm(2)
    examples = generation_examples(6, seed=8)
    _, losses = collect_gradients_and_losses(
        model, examples, task="generation", batch_size=4, device="cpu"
    )
    forward_only = per_sample_losses(model, examples, task="generation", batch_size=3)
    _, expected = reference_gradients(model, examples, "generation")
    torch.testing.assert_close(forward_only.double(), expected.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, forward_only, rtol=1e-5, atol=1e-6)


def test_progress_reports_every_batch():
    model = tiny_classifier(0)
    calls = []
    collect_gradients(
        model,
        classification_examples(7, 0),
        task="classification",
        batch_size=3,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(3, 7), (6, 7), (7, 7)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"task": "regression"}, "task should be one of"),
        ({"task": "text-to-image"}, "needs diffusion"),
        ({"task": "classification", "batch_size": 0}, "batch_size should be"),
        ({"task": "classification", "method": "vmap"}, "method should be"),
        ({"task": "generation"}, None),
    ],
)
def test_bad_settings_are_one_line_user_errors(kwargs, match):
    model = tiny_classifier(0)
    examples = classification_examples(2, 0)
    if match is None:  # generation examples need per-token labels; classification has scalars
        examples = [{"input_ids": e["input_ids"]} for e in examples]
        match = "lack keys"
    with pytest.raises(DataInfError, match=match) as info:
        collect_gradients(model, examples, **kwargs)
    assert "\n" not in str(info.value)


def test_diffusion_settings_validate():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    with pytest.raises(GradientSettingsError, match="reduction"):
        DiffusionLossSettings(noise_scheduler=scheduler, reduction="max")
    with pytest.raises(GradientSettingsError, match="outside"):
        DiffusionLossSettings(noise_scheduler=scheduler, timesteps=(25, 1000))
    with pytest.raises(GradientSettingsError, match="'shared' or 'per_sample'"):
        DiffusionLossSettings(noise_scheduler=scheduler, noise="fresh")
    assert DiffusionLossSettings(noise_scheduler=scheduler).timesteps == (
        25,
        205,
        385,
        565,
        745,
        925,
    )


def test_bfloat16_model_gives_float32_gradients():
    model = tiny_classifier(0).to(torch.bfloat16)
    examples = classification_examples(4, seed=2)
    grads, losses = collect_gradients_and_losses(
        model, examples, task="classification", batch_size=2, device="cpu"
    )
    expected, _ = reference_gradients(tiny_classifier(0), examples, "classification")
    for name, value in grads.items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
        # bf16 keeps ~3 significant digits: close to the float32 model, not equal.
        scale = expected[name].abs().max()
        assert (value - expected[name]).abs().max() <= 0.1 * scale + 1e-3, name
    assert losses.dtype == torch.float32


def test_merged_adapter_warns_that_layers_are_unused(caplog):
    model = tiny_classifier(0)
    model.merge_adapter()  # LoRA folded into the base weights: the LoRA layers are not called
    with caplog.at_level("WARNING", logger="datainf_core.gradients"):
        grads = collect_gradients(
            model, classification_examples(2, 0), task="classification", device="cpu"
        )
    assert "never used" in caplog.text
    assert all(grads[name].abs().sum() == 0 for name in grads if "lora_" in name)
