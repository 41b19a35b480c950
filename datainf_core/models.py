"""Loading the base model, its tokenizer and the project's LoRA adapter, safely.

Safety defaults: weights are read from safetensors only (a pickle checkpoint is refused unless
``allow_pickle = true`` in ``[model]``, and then loaded with ``weights_only=True``);
``trust_remote_code`` stays off unless the project file turns it on. Every problem raises
:class:`~datainf_core.errors.ModelError` with a one-line message.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datainf_core.errors import ModelError

if TYPE_CHECKING:
    import peft
    import torch

    from datainf_core.project import Project

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
# peft task types that fit each project task (None: a plain adapter, e.g. saved without one).
ADAPTER_TASK_TYPES = {
    "classification": ("SEQ_CLS", None),
    "generation": ("CAUSAL_LM", None),
}


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:240]


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"`` → ``torch.float32`` (the names in project.DTYPES)."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _check_safe_weights(folder: Path, *, allow_pickle: bool, what: str) -> None:
    """Refuses a local folder whose only weights are pickle files, unless pickle is allowed."""
    if not folder.is_dir():
        return
    names = [p.name for p in folder.iterdir() if p.is_file()]
    has_safe = any(n.endswith(".safetensors") for n in names) or any(
        n.endswith(".gguf") for n in names
    )
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) and n != "training_args.bin"]
    if pickles and not has_safe and not allow_pickle:
        raise ModelError(
            f"{what} {folder} has only pickle weights ({pickles[0]}), which can run code when "
            "loaded; convert them to safetensors or set allow_pickle = true in [model] if you "
            "trust the source"
        )


def load_tokenizer(project: Project) -> Any:
    """The base model's tokenizer; for generation a missing pad token is set to EOS."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    if project.task == "text-to-image":
        raise ModelError(
            "load_tokenizer is for classification and generation; text-to-image projects load "
            "their tokenizer with diffusion.load_diffusion"
        )
    kwargs: dict[str, Any] = {"trust_remote_code": project.model.trust_remote_code}
    if project.model.gguf_file:
        kwargs["gguf_file"] = project.model.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(project.base_location, **kwargs)
    except Exception as exc:
        raise ModelError(
            f"cannot load the tokenizer of base model {project.base_location!r} ({_short(exc)}); "
            "check [model] base (a local folder with tokenizer files, or a downloaded hub id)"
        ) from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_task_fits(project: Project, config: Any) -> None:
    architectures = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(
            f"base model {project.base_location!r} is an encoder-decoder ({model_type}); task "
            f"{project.task!r} needs a decoder-only (generation) or encoder (classification) model"
        )
    if project.task == "generation" and architectures:
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
        if not causal:
            raise ModelError(
                f"base model {project.base_location!r} ({', '.join(architectures)}) is not a "
                "causal language model; task 'generation' needs one (e.g. a *ForCausalLM "
                'checkpoint), or set task = "classification"'
            )


def load_base_model(project: Project, *, device: str = "auto") -> torch.nn.Module:
    """The base model for the project's task, in eval mode on ``device``.

    Classification gets ``AutoModelForSequenceClassification`` with ``num_labels = len(labels)``
    (the head is newly initialised when the checkpoint has none); generation gets
    ``AutoModelForCausalLM``. A GGUF checkpoint (``gguf_file``) is dequantised to ``dtype``.

    Raises:
        ModelError: Missing/unreadable model, pickle-only weights without ``allow_pickle``, or a
            model that does not fit the task.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    from datainf_core.device import resolve_device

    _quiet_transformers()
    if project.task == "text-to-image":
        raise ModelError(
            "load_base_model is for classification and generation; text-to-image projects load "
            "their UNet with diffusion.load_diffusion"
        )
    location = project.base_location
    settings = project.model
    if project.base_is_local:
        _check_safe_weights(Path(location), allow_pickle=settings.allow_pickle, what="base model")
    kwargs: dict[str, Any] = {
        "trust_remote_code": settings.trust_remote_code,
        "dtype": torch_dtype(settings.dtype),
    }
    if settings.gguf_file:
        kwargs["gguf_file"] = settings.gguf_file
    elif not settings.allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        config = AutoConfig.from_pretrained(
            location,
            trust_remote_code=settings.trust_remote_code,
            **({"gguf_file": settings.gguf_file} if settings.gguf_file else {}),
        )
    except Exception as exc:
        raise ModelError(
            f"cannot read the config of base model {location!r} ({_short(exc)}); check [model] "
            "base (a local model folder, or a hub id already in the local cache)"
        ) from exc
    _check_task_fits(project, config)
    started = time.perf_counter()
    try:
        if project.task == "classification":
            labels = project.data.labels or []
            model = AutoModelForSequenceClassification.from_pretrained(
                location,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)},
                ignore_mismatched_sizes=True,
                **kwargs,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except ModelError:
        raise
    except Exception as exc:
        hint = (
            "the folder has no safetensors weights; convert them or set allow_pickle = true"
            if "safetensors" in str(exc).lower() and not settings.allow_pickle
            else f"check that it is a {project.task} model of a supported architecture"
        )
        raise ModelError(f"cannot load base model {location!r} ({_short(exc)}); {hint}") from exc
    if project.task == "classification" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None) or 0
    model.to(resolve_device(device))
    model.eval()
    logger.info("loaded base model %s in %.2f seconds", location, time.perf_counter() - started)
    return model


def _read_adapter_config(adapter: Path) -> dict[str, Any]:
    if not adapter.is_dir():
        raise ModelError(
            f"adapter folder not found: {adapter}; fix [model] adapter or run `datainf train`"
        )
    path = adapter / ADAPTER_CONFIG
    if not path.is_file():
        raise ModelError(
            f"{adapter} is not a PEFT adapter folder (no {ADAPTER_CONFIG}); point [model] adapter "
            "at a folder saved by peft's save_pretrained"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({_short(exc)}); re-save the adapter") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{path} should hold a JSON object; re-save the adapter")
    return config


def _tail(value: str) -> str:
    return value.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()


def _same_files(first: Path, second: Path) -> bool:
    """Two model folders with the same config.json and the same weight file sizes."""
    config_a, config_b = first / "config.json", second / "config.json"
    if not (config_a.is_file() and config_b.is_file()):
        return False
    if config_a.read_bytes() != config_b.read_bytes():
        return False

    def sizes(folder: Path) -> list[tuple[str, int]]:
        return sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors"))

    return sizes(first) == sizes(second)


def _same_model(recorded: str, project: Project) -> bool:
    """Whether the adapter's recorded base is the project's base.

    Same when the strings or resolved paths are equal, when the last path components agree (a moved
    or copied folder, a local copy of a hub id, e.g. ``all-MiniLM-L6-v2``), or when both are local
    folders with identical ``config.json`` and weight file sizes.
    """
    current = project.base_location
    if recorded in (current, project.model.base) or _tail(recorded) == _tail(current):
        return True
    recorded_path = Path(recorded).expanduser()
    if recorded_path.is_dir() and Path(current).is_dir():
        if recorded_path.resolve() == Path(current).resolve():
            return True
        return _same_files(recorded_path, Path(current))
    return False


def _adapter_tensor_names(adapter: Path, *, allow_pickle: bool) -> list[str]:
    """Tensor names in the adapter's weights file (safetensors; pickle only when allowed)."""
    safe = adapter / ADAPTER_SAFETENSORS
    if safe.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(safe), framework="pt") as handle:
                return list(handle.keys())
        except Exception as exc:
            raise ModelError(
                f"adapter weights {safe} cannot be read ({_short(exc)}); re-save the adapter"
            ) from exc
    pickles = [
        p
        for p in adapter.iterdir()
        if p.name.startswith("adapter_model") and p.suffix in PICKLE_SUFFIXES
    ]
    if not pickles:
        raise ModelError(
            f"adapter folder {adapter} has no {ADAPTER_SAFETENSORS}; save the adapter with peft's "
            "save_pretrained (safetensors)"
        )
    if not allow_pickle:
        raise ModelError(
            f"adapter folder {adapter} has only a pickle checkpoint ({pickles[0].name}), which can "
            "run code when loaded; convert it to safetensors or set allow_pickle = true in [model]"
        )
    import torch

    try:
        state = torch.load(pickles[0], map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"adapter weights {pickles[0]} cannot be loaded safely ({_short(exc)}); re-save the "
            "adapter as safetensors"
        ) from exc
    return list(state.keys())


def check_adapter_matches_base(project: Project) -> None:
    """Raises ModelError when the adapter folder is unusable or was trained on another base.

    Checks: the folder and ``adapter_config.json`` exist, its ``base_model_name_or_path`` names the
    project's base, its task type fits the project task, and its weights hold LoRA tensors.
    """
    adapter = project.adapter_path
    if adapter is None:
        raise ModelError(
            "the project has no adapter; set [model] adapter or run `datainf train DIR` to "
            "fine-tune one"
        )
    config = _read_adapter_config(adapter)
    recorded = config.get("base_model_name_or_path")
    if recorded and not _same_model(str(recorded), project):
        raise ModelError(
            f"adapter {adapter} was trained on base model {recorded!r}, not on the project's base "
            f"{project.model.base!r}; use the matching base or retrain the adapter"
        )
    task_type = config.get("task_type")
    allowed = ADAPTER_TASK_TYPES.get(project.task)
    if allowed is not None and task_type not in allowed:
        raise ModelError(
            f"adapter {adapter} has task_type {task_type!r}, which does not fit task "
            f"{project.task!r} (expected {allowed[0]}); use a matching adapter or task"
        )
    names = _adapter_tensor_names(adapter, allow_pickle=project.model.allow_pickle)
    if not any("lora_" in name for name in names):
        raise ModelError(
            f"adapter {adapter} holds no LoRA tensors ({len(names)} tensors, none named lora_*); "
            "point [model] adapter at a LoRA adapter saved by peft"
        )


def load_adapted_model(
    project: Project, *, device: str = "auto", is_trainable: bool = True
) -> peft.PeftModel:
    """The base model with the project's LoRA adapter, in eval mode on ``device``.

    Args:
        project: The project.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        is_trainable: Leave adapter tensors with ``requires_grad=True`` (needed for gradients).

    Raises:
        ModelError: No adapter, a mismatching or broken adapter, or a base model that fails.
    """
    from peft import PeftModel

    from datainf_core.device import resolve_device

    check_adapter_matches_base(project)
    adapter = project.adapter_path
    assert adapter is not None
    base = load_base_model(project, device="cpu")
    started = time.perf_counter()
    try:
        # Pickle weights were refused above unless allowed; peft reads them with weights_only.
        model = PeftModel.from_pretrained(base, os.fspath(adapter), is_trainable=is_trainable)
    except Exception as exc:
        raise ModelError(
            f"adapter {adapter} does not fit base model {project.base_location!r} ({_short(exc)}); "
            "use the base it was trained on, or retrain it"
        ) from exc
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if is_trainable and not any("lora_" in n for n in trainable):
        raise ModelError(
            f"adapter {adapter} left no trainable LoRA tensors on the model; check its "
            "target_modules against the base model's layer names"
        )
    model.to(resolve_device(device))
    model.eval()
    logger.info(
        "loaded adapter %s (%d trainable tensors) in %.2f seconds",
        adapter,
        len(trainable),
        time.perf_counter() - started,
    )
    return model


# ---- causal LM logits where the loss needs them ---------------------------------------------------
_KEEPS_LOGITS: dict[type, bool] = {}


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether the (PEFT-unwrapped) model's forward takes ``logits_to_keep`` (transformers ≥ 4.50)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = type(inner)
    if kind not in _KEEPS_LOGITS:
        try:
            _KEEPS_LOGITS[kind] = "logits_to_keep" in inspect.signature(inner.forward).parameters
        except (TypeError, ValueError):
            _KEEPS_LOGITS[kind] = False
    return _KEEPS_LOGITS[kind]


def causal_lm_logits(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits at the positions whose target counts, and those targets.

    Position ``t`` predicts token ``t + 1``. Only positions where some row of the batch has a
    target go through the output layer (``logits_to_keep``): with the loss on the response, most
    of a prompt's positions skip the vocabulary-sized product. Models without ``logits_to_keep``
    get every position.

    Args:
        model: A causal LM (PEFT-wrapped or not).
        input_ids: ``batch x T`` token ids.
        attention_mask: ``batch x T``.
        labels: ``batch x T`` targets, ``ignore_index`` where the loss does not count.

    Returns:
        ``(logits, targets)``: ``batch x K x vocab`` and ``batch x K`` with ``K <= T - 1``; the
        per-token cross-entropy over them (``ignore_index`` ignored) equals the full one's.
    """
    targets = labels[:, 1:]  # batch x (T-1)
    used = (targets != ignore_index).any(dim=0).nonzero().squeeze(1)  # K positions
    if used.numel() < targets.shape[1] and _accepts_logits_to_keep(model):
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=used
        ).logits  # batch x K x vocab
        return logits, targets[:, used]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[:, :-1, :], targets
