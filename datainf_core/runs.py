"""One influence run: model → examples → gradients → scores and signals, in ``runs/<run-id>/``.

A run folder holds (see ARCHITECTURE.md): ``settings.json``, ``status.json`` (state, stage, done,
total, eta, error; rewritten atomically as the run goes), ``timings.json``, ``scores.parquet``
(``train_index``, ``method``, ``score``), ``per_query.parquet`` with per-query scores,
``signals.parquet`` (one column per mislabel signal plus ``combined``) and ``evaluation.json``
when the truth is known. Every file is written atomically (temporary file + rename).

Run ids sort by creation time (``YYYYMMDD-HHMMSS-mmm-xxxx``, UTC). A run started from the app runs
in a detached worker (``python -m datainf_core run DIR --run-id ID ...``); the worker polls a
``cancel`` file in the run folder after every chunk of work.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from datainf_core import launch
from datainf_core.errors import DataInfError
from datainf_core.project import Project, write_atomic

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

KNOWN_METHODS = ("datainf", "exact", "lissa", "hessian_free")
COSINE_SUFFIX = "_cosine"
# Scored in every run (aggregate only, unless asked for as methods): the combined ranking's
# inputs (evaluate.combined_weights). Both are closed-form; they cost what DataInf itself does.
COMPANION_METHODS = ("datainf_cosine", "hessian_free_cosine")
STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
CANCEL_FILE = "cancel"
STATUS_FILE = "status.json"
SETTINGS_FILE = "settings.json"
SHARD_SIZE_ENV = "DATAINF_SHARD_SIZE"

Progress = Callable[[int, int, str], None]


class RunError(DataInfError):
    """A run setting is invalid, or a run folder or its results are missing."""


class RunCancelled(DataInfError):
    """The run was cancelled (``cancel`` file or Ctrl-C) before it finished."""


def influence_methods() -> tuple[str, ...]:
    """The engine's method names (``influence.METHODS``), or the agreed four if it is absent."""
    try:
        from datainf_core.influence import METHODS
    except ImportError:
        return KNOWN_METHODS
    return tuple(METHODS)


def split_method(name: str) -> tuple[str, bool]:
    """``"datainf_cosine"`` → ``("datainf", True)``; ``"lissa"`` → ``("lissa", False)``."""
    if name.endswith(COSINE_SUFFIX):
        return name[: -len(COSINE_SUFFIX)], True
    return name, False


@dataclass
class RunSettings:
    """What one run computes (saved as ``settings.json`` in the run folder).

    Attributes:
        methods: Influence methods (``influence.METHODS``), each optionally suffixed ``_cosine``
            for the unit-norm variant. :data:`COMPANION_METHODS` are scored as well (aggregate
            scores only), as inputs of the combined ranking.
        per_query: Also compute the (queries x train) score matrix (``per_query.parquet``).
        damping: Damping λ passed to the engine (relative to the mean squared gradient norm).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        loss_tokens: Generation only: ``"prompt"``, ``"response"`` or ``"all"``; None uses the
            project's ``[influence] loss_tokens``.
        self_influence: Add the ``self_influence`` signal.
        train_loss: Add the per-sample training loss signal (``train_loss``).
        nproc: Local processes (``torch.distributed`` ranks) for gradients and scores; 1 runs
            in this process. Under torchrun the launcher's world size applies instead.
        projection_dim: Store per-sample gradients randomly projected to this many dimensions
            per block (blocks no wider are kept as they are); None keeps them whole. See
            :mod:`datainf_core.projection` for the trade-off.
    """

    methods: list[str] = field(default_factory=lambda: ["datainf"])
    per_query: bool = False
    damping: float = 0.1
    device: str = "auto"
    loss_tokens: str | None = None
    self_influence: bool = True
    train_loss: bool = True
    nproc: int = 1
    projection_dim: int | None = None

    def validate(self) -> None:
        """Raises RunError naming the first bad setting and the fix."""
        known = influence_methods()
        if not self.methods:
            raise RunError(f"no influence method chosen; pick one or more of {', '.join(known)}")
        for name in self.methods:
            base, _ = split_method(name)
            if base not in known:
                raise RunError(
                    f"unknown influence method {name!r}; use one of {', '.join(known)} "
                    f"(optionally with the suffix {COSINE_SUFFIX})"
                )
        if len(set(self.methods)) != len(self.methods):
            raise RunError(f"influence methods {self.methods} repeat a name; list each once")
        if not (isinstance(self.damping, int | float) and math.isfinite(self.damping)):
            raise RunError(f"damping must be a finite number, got {self.damping!r}; e.g. 0.1")
        if self.damping <= 0:
            raise RunError(f"damping must be positive, got {self.damping}; e.g. 0.1")
        if self.loss_tokens not in (None, "prompt", "response", "all"):
            raise RunError(
                f"loss_tokens {self.loss_tokens!r} is not valid; use prompt, response or all"
            )
        if self.nproc < 1:
            raise RunError(f"nproc must be at least 1, got {self.nproc}")
        if self.projection_dim is not None and (
            isinstance(self.projection_dim, bool)
            or not isinstance(self.projection_dim, int)
            or self.projection_dim < 1
        ):
            raise RunError(
                f"projection_dim must be a positive integer, got {self.projection_dim!r}; "
                "e.g. 4096, or leave it out to keep whole gradients"
            )
        _check_device(self.device)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunSettings:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})


def _check_device(device: str) -> None:
    """RunError for a device name torch does not know or this machine does not have."""
    if device == "auto":
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise RunError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available()
        and (parsed.index is None or parsed.index < torch.cuda.device_count()),
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }.get(parsed.type, False)
    if not available:
        raise RunError(
            f"device {device!r} is not available on this machine; use --device auto or cpu"
        )


@dataclass
class RunInfo:
    """One row of :func:`list_runs`."""

    run_id: str
    path: Path
    state: str
    stage: str
    created: str
    methods: list[str]
    per_query: bool
    error: str | None = None


# ---- small helpers ----------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_run_id() -> str:
    """A run id that sorts by creation time: ``20261203-150412-123-a1b2`` (UTC)."""
    now = datetime.now(UTC)
    return f"{now:%Y%m%d-%H%M%S}-{now.microsecond // 1000:03d}-{secrets.token_hex(2)}"


def _json_ready(value: Any) -> Any:
    """Replaces NaN/inf by None (JSON has no such numbers) and Paths by strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return _json_ready(value.item())
    return value


def write_json(path: Path, content: Any) -> None:
    """Atomic JSON write."""
    write_atomic(path, json.dumps(_json_ready(content), indent=2, allow_nan=False) + "\n")


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    """Atomic Parquet write."""
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    write_atomic(path, buffer.getvalue())


def run_dir(project: Project, run_id: str) -> Path:
    """The folder of ``run_id`` (RunError when the id has path characters)."""
    if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
        raise RunError(f"invalid run id {run_id!r}; use an id listed by list_runs")
    return project.runs_dir / run_id


def _existing_run_dir(project: Project, run_id: str) -> Path:
    folder = run_dir(project, run_id)
    if not folder.is_dir():
        raise RunError(
            f"run {run_id!r} not found in {project.runs_dir}; pick one of the listed runs"
        )
    return folder


def _file_digest(path: Path, digest: Any) -> None:
    """Feeds a file (or every file below a folder, sorted) into ``digest``."""
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(child.relative_to(path).as_posix().encode())
            _file_digest(child, digest)
        return
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def content_hash(path: Path | None) -> str:
    """SHA-256 of a file's bytes (or of a folder's files), ``"none"`` for None."""
    if path is None:
        return "none"
    digest = hashlib.sha256()
    _file_digest(path, digest)
    return digest.hexdigest()


def _base_fingerprint(project: Project) -> str:
    """The base model reference plus the content hash of its config (weights are big)."""
    if not project.base_is_local:
        return project.model.base
    base = Path(project.base_location)
    parts = [str(base), project.model.gguf_file or ""]
    for name in ("config.json", "model.safetensors.index.json", "model_index.json"):
        if (base / name).is_file():
            parts.append(content_hash(base / name))
    for weights in sorted(base.glob("*.safetensors")) + sorted(base.glob("*.gguf")):
        stat = weights.stat()
        parts.append(f"{weights.name}:{stat.st_size}:{int(stat.st_mtime)}")
    return "|".join(parts)


def gradient_store_key(
    project: Project, split: str, *, loss_tokens: str, adapter_hash: str
) -> dict[str, str]:
    """What the gradients of one split depend on (hashed by the store for its manifest)."""
    data_path = project.train_path if split == "train" else project.validation_path
    return {
        "split": split,
        "task": project.task,
        "base": _base_fingerprint(project),
        "dtype": project.model.dtype,
        "adapter": adapter_hash,
        "data": content_hash(data_path),
        "columns": json.dumps(
            {k: v for k, v in asdict(project.data).items() if k not in ("train", "validation")},
            sort_keys=True,
        ),
        "loss_tokens": loss_tokens if project.task == "generation" else "-",
        "include": json.dumps(project.influence.include),
    }


# ---- status ----------------------------------------------------------------------------------
class _StatusWriter:
    """Keeps ``status.json`` current; raises RunCancelled once a ``cancel`` file appears."""

    def __init__(
        self, folder: Path, run_id: str, progress: Progress | None, *, enabled: bool = True
    ) -> None:
        self.enabled = enabled  # False on ranks other than 0: they only check for cancel
        self.folder = folder
        self.run_id = run_id
        self.progress = progress
        self.started = time.time()
        self.stage = "starting"
        self.stage_started = time.time()
        self.last_write = 0.0
        self.timings: dict[str, float] = {}
        self.status: dict[str, Any] = {
            "run_id": run_id,
            "state": "running",
            "stage": self.stage,
            "done": 0,
            "total": 0,
            "eta": None,
            "error": None,
            "pid": os.getpid(),
            "created": _now(),
            "updated": _now(),
        }

    def write(self, **changes: Any) -> None:
        self.status.update(changes)
        if not self.enabled:
            return
        self.status["updated"] = _now()
        self.status["elapsed"] = round(time.time() - self.started, 3)
        write_json(self.folder / STATUS_FILE, self.status)
        self.last_write = time.time()

    def check_cancel(self) -> None:
        if (self.folder / CANCEL_FILE).exists():
            raise RunCancelled(f"run {self.run_id} was cancelled")

    def begin(self, stage: str, total: int) -> None:
        self.end_stage()
        self.check_cancel()
        self.stage = stage
        self.stage_started = time.time()
        logger.info("run %s: %s", self.run_id, stage)
        self.write(stage=stage, done=0, total=total, eta=None)
        if self.progress is not None:
            self.progress(0, total, stage)

    def end_stage(self) -> None:
        if self.stage != "starting" and self.stage not in self.timings:
            self.timings[self.stage] = round(time.time() - self.stage_started, 3)

    def update(self, done: int, total: int) -> None:
        """Progress inside the current stage (called by the gradient and influence code)."""
        self.check_cancel()
        elapsed = time.time() - self.stage_started
        eta = elapsed / done * (total - done) if done > 0 and total >= done else None
        if self.progress is not None:
            self.progress(done, total, self.stage)
        if time.time() - self.last_write >= 0.5 or done >= total:
            self.write(done=done, total=total, eta=None if eta is None else round(eta, 1))

    def callback(self) -> Callable[[int, int], None]:
        return lambda done, total: self.update(int(done), int(total))


# ---- the run --------------------------------------------------------------------------------
@dataclass
class _Loaded:
    model: Any
    train_examples: list[dict[str, Any]]
    query_examples: list[dict[str, Any]]
    train_df: pd.DataFrame
    validation_df: pd.DataFrame
    diffusion: Any = None


def _load_inputs(project: Project, settings: RunSettings, loss_tokens: str) -> _Loaded:
    """Model and train/validation examples for the project's task."""
    from datainf_core import data

    train_df = data.load_split(project, "train")
    validation_df = data.load_split(project, "validation")
    if project.task == "text-to-image":
        from datainf_core import diffusion
        from datainf_core.gradients import DiffusionLossSettings

        bundle = diffusion.load_diffusion(project, device=settings.device)
        timesteps = getattr(diffusion, "default_timesteps", None)
        loss = DiffusionLossSettings(
            noise_scheduler=bundle.noise_scheduler,
            vae=bundle.vae,
            noise=project.influence.diffusion_noise,
            **({"timesteps": tuple(timesteps(bundle.noise_scheduler))} if timesteps else {}),
        )
        return _Loaded(
            model=bundle.unet,
            train_examples=diffusion.build_image_examples(project, train_df, bundle),
            query_examples=diffusion.build_image_examples(project, validation_df, bundle),
            train_df=train_df,
            validation_df=validation_df,
            diffusion=loss,
        )
    from datainf_core import models

    tokenizer = models.load_tokenizer(project)
    model = models.load_adapted_model(project, device=settings.device, is_trainable=True)
    return _Loaded(
        model=model,
        train_examples=data.build_examples(project, train_df, tokenizer, loss_tokens=loss_tokens),
        query_examples=data.build_examples(
            project, validation_df, tokenizer, loss_tokens=loss_tokens
        ),
        train_df=train_df,
        validation_df=validation_df,
    )


def _collect(
    project: Project,
    loaded: _Loaded,
    examples: list[dict[str, Any]],
    *,
    split: str,
    key: dict[str, str],
    settings: RunSettings,
    status: _StatusWriter,
) -> Mapping[str, Any]:
    """Per-sample gradients of one split, through the on-disk gradient store (cached)."""
    from datainf_core import gradients

    common: dict[str, Any] = {
        "task": project.task,
        "include": project.influence.include,
        "batch_size": project.influence.batch_size,
        "device": settings.device,
        "diffusion": loaded.diffusion,
        "progress": status.callback(),
    }
    try:
        from datainf_core.store import collect_gradients_to_store
    except ImportError:
        logger.warning("datainf_core.store is missing; keeping gradients in memory")
        return gradients.collect_gradients(loaded.model, examples, **common)
    if SHARD_SIZE_ENV in os.environ:
        common["shard_size"] = _shard_size()
    if settings.projection_dim is not None:
        common["projection_dim"] = settings.projection_dim
    # The store keeps one subfolder per key hash below this folder (cache hit = no recompute).
    store_dir = project.gradients_dir / split
    if launch.rank_and_world()[1] > 1:
        from datainf_core.distributed import collect_gradients_to_store_distributed

        return collect_gradients_to_store_distributed(
            loaded.model, examples, store_dir, key=key, **common
        )
    return collect_gradients_to_store(loaded.model, examples, store_dir, key=key, **common)


def _shard_size() -> int:
    """Samples per gradient shard from ``DATAINF_SHARD_SIZE`` (part of the store's key)."""
    value = os.environ[SHARD_SIZE_ENV]
    if not value.isdigit() or int(value) < 1:
        raise RunError(f"{SHARD_SIZE_ENV}={value!r} should be a positive integer; e.g. 256")
    return int(value)


def _per_query_frame(matrix: torch.Tensor, method: str) -> pd.DataFrame:
    """Long format of a (m, n) score matrix: query_index, train_index, method, score."""
    import numpy as np

    values = matrix.detach().cpu().double().numpy()  # m x n
    m, n = values.shape
    return pd.DataFrame(
        {
            "query_index": np.repeat(np.arange(m), n),
            "train_index": np.tile(np.arange(n), m),
            "method": method,
            "score": values.reshape(-1),
        }
    )


def _check_finite(name: str, values: torch.Tensor) -> None:
    import torch

    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise RunError(
            f"{name} has {bad} NaN/inf values (a float16 overflow or a diverged adapter?); "
            'set dtype = "float32" in [model] or retrain the adapter'
        )


def _compute_method(
    name: str,
    train_grads: Mapping[str, Any],
    query_grads: Mapping[str, Any],
    *,
    settings: RunSettings,
    aggregate: str | None,
    progress: Callable[[int, int], None],
) -> torch.Tensor | None:
    """Scores of one method (n or m x n); None on ranks other than 0 when rank 0 runs it alone."""
    from datainf_core import influence

    base, cosine = split_method(name)
    kwargs: dict[str, Any] = {
        "method": base,
        "damping": settings.damping,
        "aggregate": aggregate,
        "unit_norm": cosine,
        "progress": progress,
    }
    rank, world = launch.rank_and_world()
    if world > 1:
        from datainf_core import distributed

        if distributed.splits_over_ranks(base, train_grads):
            return distributed.compute_influence_over_ranks(
                train_grads, query_grads, device=settings.device, **kwargs
            )
        if rank != 0:
            return None  # rank 0 computes it alone
    return influence.compute_influence(train_grads, query_grads, **kwargs)


def _compute_self_influence(
    train_grads: Mapping[str, Any], *, settings: RunSettings, status: _StatusWriter
) -> torch.Tensor | None:
    """Self-influence (n), over the ranks where it can; else rank 0 alone (None elsewhere)."""
    from datainf_core import influence

    rank, world = launch.rank_and_world()
    if world > 1:
        from datainf_core import distributed

        if distributed.splits_over_ranks("self_influence", train_grads):
            return distributed.compute_self_influence_over_ranks(
                train_grads, damping=settings.damping, progress=status.callback()
            )
        if rank != 0:
            return None
    return influence.compute_self_influence(
        train_grads, damping=settings.damping, progress=status.callback()
    )


def execute_run(
    project: Project,
    settings: RunSettings,
    *,
    run_id: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Runs gradients → scores → signals → evaluation.

    In this process; with ``settings.nproc > 1`` in that many spawned ranks; under torchrun as
    one rank of its process group (see :mod:`datainf_core.launch`). Ranks split the gradient
    collection and the scoring; rank 0 writes the run folder.

    Args:
        project: A validated project with an adapter.
        settings: What to compute.
        run_id: Use this id (the folder may already hold ``settings.json`` from
            :func:`start_run_process`); None makes a new one.
        progress: Optional ``progress(done, total, stage)`` after every chunk of work.

    Returns:
        The run folder.

    Raises:
        DataInfError: A user mistake (bad settings, data, model); the status says ``failed``.
        RunCancelled: The ``cancel`` file appeared or Ctrl-C was pressed.
    """
    settings.validate()
    if settings.nproc > 1 and launch.launched_world_size() == 1:
        return _spawn_ranks(project, settings, run_id or new_run_id())
    joined = launch.join_process_group(settings.device)  # under torchrun or a spawned rank
    try:
        rank = launch.rank_and_world()[0]
        run_id = launch.broadcast_text(run_id or new_run_id())
        folder = run_dir(project, run_id)
        folder.mkdir(parents=True, exist_ok=True)
        status = _StatusWriter(folder, run_id, progress if rank == 0 else None, enabled=rank == 0)
        _run_as_rank(project, settings, folder, status)
    finally:
        if joined:
            launch.leave_process_group()
    return folder


def _spawn_ranks(project: Project, settings: RunSettings, run_id: str) -> Path:
    """``--nproc N`` on one machine: N spawned ranks run the whole run; rank 0 writes it."""
    folder = run_dir(project, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    status = _StatusWriter(folder, run_id, None)
    _write_settings(folder, status, settings, project)
    started = time.perf_counter()
    try:
        launch.spawn_run(project.root, asdict(settings), run_id, settings.nproc)
    except launch.LaunchError as exc:
        with contextlib.suppress(OSError, ValueError):  # rank 0's last status, if any
            status.status.update(json.loads((folder / STATUS_FILE).read_text(encoding="utf-8")))
        if (folder / CANCEL_FILE).exists():
            status.write(state="cancelled", error=f"cancelled during {status.status['stage']}")
            raise RunCancelled(f"run {run_id} was cancelled") from None
        status.write(state="failed", error=str(exc))  # the first rank that failed
        raise
    logger.info(
        "run %s: %d processes in %.2f seconds",
        run_id,
        settings.nproc,
        time.perf_counter() - started,
    )
    return folder


def _run_as_rank(
    project: Project, settings: RunSettings, folder: Path, status: _StatusWriter
) -> None:
    """The run in this process (rank 0 of 1, or one rank of a process group)."""
    run_id = status.run_id
    loss_tokens = _write_settings(folder, status, settings, project)
    status.write()
    try:
        _execute(project, settings, folder, status, loss_tokens)
    except (RunCancelled, KeyboardInterrupt) as exc:
        status.end_stage()
        status.write(state="cancelled", error=f"cancelled during {status.stage}")
        write_json(folder / "timings.json", status.timings)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise RunCancelled(f"run {run_id} was cancelled during {status.stage}") from None
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, DataInfError):
            message = f"{type(exc).__name__}: {message}"
        rank, world = launch.rank_and_world()
        if world > 1:  # one line per rank, e.g. a rank that lost its peers
            message = f"rank {rank} of {world} failed during {status.stage}: {message}"
        status.write(state="failed", error=message)
        if world > 1:
            raise launch.LaunchError(message) from exc
        raise


def _fit_check(signals: pd.DataFrame, validation: Any) -> dict[str, Any] | None:
    """evaluate.fit_check from the training losses and the validation store's losses, if both."""
    from datainf_core import evaluate

    losses = getattr(validation, "losses", None)  # stored with the validation gradients
    if "train_loss" not in signals.columns or losses is None:
        return None
    try:
        return evaluate.fit_check(signals["train_loss"].to_numpy(), losses.double().cpu().numpy())
    except ValueError as error:  # e.g. a zero validation loss: no ratio to report
        logger.warning("fit check skipped: %s", error)
        return None


def _write_settings(
    folder: Path, status: _StatusWriter, settings: RunSettings, project: Project
) -> str:
    """Writes ``settings.json`` (rank 0 only); returns the loss tokens the run uses."""
    loss_tokens = settings.loss_tokens or project.influence.loss_tokens
    if status.enabled:
        content = {"run_id": status.run_id, "created": status.status["created"]}
        content.update(settings=asdict(settings), loss_tokens=loss_tokens)
        write_json(folder / SETTINGS_FILE, {**content, "project": project.to_dict()})
    return loss_tokens


def _execute(
    project: Project,
    settings: RunSettings,
    folder: Path,
    status: _StatusWriter,
    loss_tokens: str,
) -> None:
    # 1. Inputs: model, tokenized train and validation examples.
    status.begin("load", 1)
    loaded = _load_inputs(project, settings, loss_tokens)
    n, m = len(loaded.train_examples), len(loaded.query_examples)
    adapter_hash = content_hash(project.adapter_path)
    status.update(1, 1)

    # 2. Per-sample gradients (cached in the gradient store).
    grads: dict[str, Mapping[str, Any]] = {}
    for split, examples, total in (
        ("train", loaded.train_examples, n),
        ("validation", loaded.query_examples, m),
    ):
        status.begin(f"{split} gradients", total)
        key = gradient_store_key(project, split, loss_tokens=loss_tokens, adapter_hash=adapter_hash)
        grads[split] = _collect(
            project, loaded, examples, split=split, key=key, settings=settings, status=status
        )

    # 3. Influence scores for each method (aggregate over queries, and per query). Every rank
    # takes part in the reductions; only rank 0 keeps the results and writes the run's files.
    rank = launch.rank_and_world()[0]
    signals = pd.DataFrame({"train_index": range(n)})
    score_frames, per_query_frames = [], []
    companions = [c for c in COMPANION_METHODS if c not in settings.methods]
    for name in [*settings.methods, *companions]:
        status.begin(f"scores: {name}", 1)
        scores = _compute_method(
            name,
            grads["train"],
            grads["validation"],
            settings=settings,
            aggregate="mean",
            progress=status.callback(),
        )  # n
        matrix = None
        if settings.per_query and name in settings.methods:
            status.begin(f"per-query scores: {name}", 1)
            matrix = _compute_method(
                name,
                grads["train"],
                grads["validation"],
                settings=settings,
                aggregate=None,
                progress=status.callback(),
            )  # m x n
        if rank != 0:
            continue
        scores = scores.reshape(-1)
        _check_finite(f"{name} scores", scores)
        signals[name] = scores.detach().cpu().double().numpy()
        score_frames.append(
            pd.DataFrame({"train_index": range(n), "method": name, "score": signals[name]})
        )
        if matrix is not None:
            per_query_frames.append(_per_query_frame(matrix, name))
    if settings.self_influence:
        status.begin("self-influence", 1)
        values = _compute_self_influence(grads["train"], settings=settings, status=status)
    if rank != 0:
        return
    write_parquet(folder / "scores.parquet", pd.concat(score_frames, ignore_index=True))
    per_query = pd.concat(per_query_frames, ignore_index=True) if per_query_frames else None
    if per_query is not None:
        write_parquet(folder / "per_query.parquet", per_query)

    # 4. The other mislabel signals: self-influence and the plain training loss.
    if settings.self_influence:
        _check_finite("self-influence", values)
        signals["self_influence"] = values.detach().cpu().double().numpy()
    if settings.train_loss:
        from datainf_core import gradients

        status.begin("training loss", n)
        stored = getattr(grads["train"], "losses", None)  # collected with the gradients
        if stored is not None and tuple(stored.shape) == (n,):
            losses = stored
        else:
            losses = gradients.per_sample_losses(
                loaded.model,
                loaded.train_examples,
                task=project.task,
                batch_size=project.influence.batch_size,
                device=settings.device,
                diffusion=loaded.diffusion,
                progress=status.callback(),
            )
        status.update(n, n)
        _check_finite("training loss", losses)
        signals["train_loss"] = losses.detach().cpu().double().numpy()

    # 5. The combined ranking (the review queue's default order) and the evaluation.
    from datainf_core import evaluate

    status.begin("evaluate", 1)
    signals["combined"] = evaluate.combined_ranking(signals).to_numpy()
    write_parquet(folder / "signals.parquet", signals)
    # Always written: the signals' agreement and the combined ranking's weights need no truth;
    # detection and identification are added where the truth is known.
    evaluation = evaluate.evaluate_signals(
        signals,
        loaded.train_df,
        per_query=per_query,
        validation_df=loaded.validation_df,
        category_column=project.data.category_column,
    )
    fit = _fit_check(signals, grads["validation"])
    if fit is not None:
        evaluation["fit"] = fit
    write_json(folder / "evaluation.json", evaluation)
    status.update(1, 1)
    status.end_stage()
    write_json(folder / "timings.json", status.timings)
    status.write(state="done", stage="done", eta=0)
    logger.info("run %s done in %.2f seconds", status.run_id, time.time() - status.started)


# ---- background runs and reading results ---------------------------------------------------------
def settings_to_argv(settings: RunSettings) -> list[str]:
    """The ``datainf run`` options that reproduce ``settings``."""
    argv: list[str] = []
    for name in settings.methods:
        argv += ["--method", name]
    if settings.per_query:
        argv.append("--per-query")
    argv += ["--damping", repr(float(settings.damping)), "--device", settings.device]
    if settings.loss_tokens is not None:
        argv += ["--loss-tokens", settings.loss_tokens]
    if not settings.self_influence:
        argv.append("--no-self-influence")
    if not settings.train_loss:
        argv.append("--no-train-loss")
    if settings.nproc != 1:
        argv += ["--nproc", str(settings.nproc)]
    if settings.projection_dim is not None:
        argv += ["--projection-dim", str(settings.projection_dim)]
    return argv


def start_run_process(project: Project, settings: RunSettings) -> str:
    """Starts a detached worker process for a new run and returns its id at once.

    The worker (``python -m datainf_core run DIR --run-id ID ...``) writes ``status.json`` as it
    goes; its output goes to ``worker.log`` in the run folder.
    """
    settings.validate()
    run_id = new_run_id()
    folder = run_dir(project, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    created = _now()
    write_json(
        folder / SETTINGS_FILE,
        {"run_id": run_id, "created": created, "settings": asdict(settings)},
    )
    status = {"run_id": run_id, "state": "queued", "stage": "queued", "done": 0, "total": 0}
    status.update({"eta": None, "error": None, "created": created, "updated": created})
    write_json(folder / STATUS_FILE, status)
    argv = [sys.executable, "-m", "datainf_core", "run", str(project.root), "--run-id", run_id]
    argv += [*settings_to_argv(settings), "--no-progress"]
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with (folder / "worker.log").open("ab") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=str(project.root),
            )
    except OSError as exc:
        status.update({"state": "failed", "error": f"cannot start the worker: {exc}"})
        write_json(folder / STATUS_FILE, status)
        raise RunError(
            f"cannot start the run worker ({exc}); check that {sys.executable} still exists"
        ) from exc
    status["pid"] = process.pid
    write_json(folder / STATUS_FILE, status)
    logger.info("started run %s (pid %d)", run_id, process.pid)
    return run_id


def process_alive(pid: int | None) -> bool:
    """Whether a worker process is running; a finished child is reaped, a zombie counts as done."""
    if not pid:
        return False
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # our own finished child: reap it
        if waited == pid:
            return False
    except ChildProcessError:
        pass  # not our child
    except OSError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True
    return True


def read_status(project: Project, run_id: str) -> dict[str, Any]:
    """The run's ``status.json``; a running run whose worker died is reported as ``failed``."""
    folder = _existing_run_dir(project, run_id)
    try:
        status = json.loads((folder / STATUS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"run_id": run_id, "state": "failed", "stage": "?", "done": 0, "total": 0,
                "eta": None, "error": "no status.json (the run never started)"}  # fmt: skip
    except (json.JSONDecodeError, UnicodeDecodeError):
        # Written atomically by the worker, so only a foreign edit or a broken disk gets here.
        return {"run_id": run_id, "state": "failed", "stage": "?", "done": 0, "total": 0,
                "eta": None, "error": "status.json is unreadable; start the run again"}  # fmt: skip
    state = status.get("state")
    stale = state == "running" or (
        # A just-started worker gets a moment to take over status.json.
        state == "queued" and time.time() - (folder / STATUS_FILE).stat().st_mtime > 30
    )
    if stale and not process_alive(status.get("pid")):
        status["state"] = "failed"
        status["error"] = status.get("error") or (
            f"the worker stopped during {status.get('stage')} (killed?); start the run again "
            "(cached gradients are reused)"
        )
    return status


def cancel_run(project: Project, run_id: str) -> None:
    """Asks the run's worker to stop after its current chunk (writes a ``cancel`` file)."""
    folder = _existing_run_dir(project, run_id)
    write_atomic(folder / CANCEL_FILE, _now() + "\n")
    logger.info("cancel requested for run %s", run_id)


def list_runs(project: Project) -> list[RunInfo]:
    """Every run of the project, newest first."""
    if not project.runs_dir.is_dir():
        return []
    infos = []
    for folder in sorted(project.runs_dir.iterdir(), reverse=True):
        if not folder.is_dir() or not (folder / SETTINGS_FILE).is_file():
            continue
        try:
            saved = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        status = read_status(project, folder.name)
        settings = saved.get("settings", {})
        infos.append(
            RunInfo(
                run_id=folder.name,
                path=folder,
                state=str(status.get("state")),
                stage=str(status.get("stage")),
                created=str(saved.get("created", "")),
                methods=list(settings.get("methods", [])),
                per_query=bool(settings.get("per_query", False)),
                error=status.get("error"),
            )
        )
    return infos


def latest_run(project: Project, *, finished_only: bool = True) -> str | None:
    """The newest run id (by default the newest that finished with state ``done``)."""
    for info in list_runs(project):
        if not finished_only or info.state == "done":
            return info.run_id
    return None


def _read_result(project: Project, run_id: str, name: str) -> Path:
    folder = _existing_run_dir(project, run_id)
    path = folder / name
    if not path.is_file():
        state = read_status(project, run_id).get("state")
        raise RunError(
            f"run {run_id} has no {name} (state: {state}); wait for it to finish or start a new run"
        )
    return path


def load_scores(project: Project, run_id: str) -> pd.DataFrame:
    """``train_index``, ``method``, ``score`` for every influence method of the run."""
    return pd.read_parquet(_read_result(project, run_id, "scores.parquet"))


def load_per_query(project: Project, run_id: str) -> pd.DataFrame | None:
    """``query_index``, ``train_index``, ``method``, ``score``; None without per-query scores."""
    path = _existing_run_dir(project, run_id) / "per_query.parquet"
    return pd.read_parquet(path) if path.is_file() else None


def load_signals(project: Project, run_id: str) -> pd.DataFrame:
    """``train_index`` plus one column per signal and ``combined``."""
    return pd.read_parquet(_read_result(project, run_id, "signals.parquet"))


def load_evaluation(project: Project, run_id: str) -> dict[str, Any] | None:
    """The run's ``evaluation.json``; None when the truth was not known."""
    path = _existing_run_dir(project, run_id) / "evaluation.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_settings(project: Project, run_id: str) -> RunSettings:
    """The settings a run was started with."""
    saved = json.loads(_read_result(project, run_id, SETTINGS_FILE).read_text(encoding="utf-8"))
    return RunSettings.from_dict(saved.get("settings", {}))


def load_timings(project: Project, run_id: str) -> dict[str, float]:
    """Seconds per stage (``timings.json``); empty while the run has not finished."""
    path = _existing_run_dir(project, run_id) / "timings.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
