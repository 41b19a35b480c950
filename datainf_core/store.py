"""On-disk store of per-sample gradients: safetensors shards plus a JSON manifest.

Layout of one store (``<store_dir>/<key hash>/``)::

    manifest.json             key, key hash, n, shard size, block names and widths, and for every
                              complete shard its file name, rows and SHA-256
    shard-00000.safetensors   rows [0, shard_size) of every block (float32) and their losses
    shard-00001.safetensors   ...

The key hash covers the caller's key (model, adapter, data, settings), the task, the adapter
blocks and their dtype, the diffusion settings and a fingerprint of the examples, so a rerun with
the same inputs reuses the store, and a run interrupted between shards resumes after the last
complete one. A shard whose checksum does
not match its manifest entry is recomputed, never read.

Reading is lazy: ``store[name]`` is a :class:`GradientBlock` whose ``[start:stop]`` slice reads
only the rows asked for, from the shards that hold them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from datainf_core.errors import StoreError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
LOSS_KEY = "__per_sample_loss__"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for piece in iter(lambda: handle.read(1 << 22), b""):
            digest.update(piece)
    return digest.hexdigest()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False))
    os.replace(tmp, path)


def examples_fingerprint(examples: Sequence[dict[str, Any]]) -> str:
    """SHA-256 over every example's keys, dtypes, shapes and values (order matters)."""
    digest = hashlib.sha256()
    for example in examples:
        for key in sorted(example):
            value = example[key]
            digest.update(key.encode())
            if isinstance(value, torch.Tensor):
                tensor = value.detach().cpu().contiguous()
                digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                digest.update(repr(value).encode())
        digest.update(b"|")
    return digest.hexdigest()


def key_hash(key: Mapping[str, Any]) -> str:
    """The hex SHA-256 of a key (a JSON-ready mapping), independent of key order."""
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class _Shard:
    index: int
    file: str
    start: int
    stop: int
    sha256: str


class GradientBlock:
    """Lazy view of one block's per-sample gradients (``n x d_block`` float32) in a store."""

    def __init__(self, store: GradientStore, name: str) -> None:
        self._store = store
        self.name = name
        self.shape = (store.n, store.block_dims[name])
        self.dtype = torch.float32

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        """Always 2."""
        return 2

    def __getitem__(self, index: slice | int) -> torch.Tensor:
        """Rows ``[start:stop]`` (step 1) as ``rows x d_block`` float32; an int gives one row."""
        if isinstance(index, int):
            row = index + self.shape[0] if index < 0 else index
            if not 0 <= row < self.shape[0]:
                raise IndexError(f"row {index} out of range for {self.shape[0]} samples")
            return self._store._read_rows(self.name, row, row + 1)[0]
        if not isinstance(index, slice):
            raise TypeError(f"a gradient block takes an int or a slice, got {type(index).__name__}")
        start, stop, step = index.indices(self.shape[0])
        if step != 1:
            raise ValueError(f"a gradient block slice needs step 1, got {step}")
        return self._store._read_rows(self.name, start, max(start, stop))

    def __repr__(self) -> str:
        return f"GradientBlock({self.name!r}, shape={self.shape})"


class GradientStore(Mapping[str, GradientBlock]):
    """A complete on-disk gradient store: block name → lazy ``n x d_block`` block.

    Attributes:
        path: The store folder (holds ``manifest.json`` and the shards).
        n: Number of samples.
        block_dims: Block name → width ``d_block``, in the model's parameter order.
        manifest: The parsed manifest.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.n = int(manifest["n"])
        self.block_dims: dict[str, int] = {k: int(v) for k, v in manifest["blocks"].items()}
        self._shards = [_Shard(**s) for s in manifest["shards"]]

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> GradientStore:
        """Opens a complete store folder.

        Args:
            path: Folder with ``manifest.json``.
            verify: Check every shard's SHA-256 against the manifest (reads every byte once).

        Raises:
            StoreError: No manifest, an incomplete store, or a missing or corrupt shard.
        """
        folder = Path(path)
        manifest = _read_manifest(folder)
        if manifest is None:
            raise StoreError(
                f"no readable gradient store manifest in {folder}; collect the gradients first "
                "(collect_gradients_to_store) or pass the store's folder"
            )
        if not manifest.get("complete"):
            raise StoreError(
                f"gradient store {folder} is incomplete ({len(manifest['shards'])} shards); "
                "rerun collect_gradients_to_store with the same key to resume it"
            )
        if verify:
            for shard in manifest["shards"]:
                if not _shard_ok(folder, shard):
                    raise StoreError(
                        f"gradient shard {folder / shard['file']} is missing or corrupt; rerun "
                        "collect_gradients_to_store with the same key to recompute it"
                    )
        return cls(folder, manifest)

    def __getitem__(self, name: str) -> GradientBlock:
        if name not in self.block_dims:
            raise KeyError(name)
        return GradientBlock(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.block_dims)

    def __len__(self) -> int:
        return len(self.block_dims)

    @property
    def losses(self) -> torch.Tensor:
        """The per-sample training losses collected with the gradients, float32 of shape ``n``."""
        return self._read_rows(LOSS_KEY, 0, self.n)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Reads every block into memory: block name → ``n x d_block`` float32 tensor."""
        return {name: self[name][:] for name in self}

    def _read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        width = self.block_dims.get(name)
        pieces: list[torch.Tensor] = []
        for shard in self._shards:
            if shard.stop <= start or shard.start >= stop:
                continue
            lo, hi = max(start, shard.start) - shard.start, min(stop, shard.stop) - shard.start
            with safe_open(self.path / shard.file, framework="pt") as handle:
                pieces.append(handle.get_slice(name)[lo:hi])
        if not pieces:
            shape = (0,) if width is None else (0, width)
            return torch.zeros(shape, dtype=torch.float32)
        return torch.cat(pieces).to(torch.float32)

    def __repr__(self) -> str:
        return f"GradientStore({str(self.path)!r}, n={self.n}, blocks={len(self)})"


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        logger.warning("Ignoring an unreadable manifest %s", path)
        return None
    if manifest.get("format") != FORMAT_VERSION:
        return None
    return manifest


def _shard_ok(folder: Path, shard: Mapping[str, Any]) -> bool:
    path = folder / shard["file"]
    return path.is_file() and _sha256_file(path) == shard["sha256"]


def collect_gradients_to_store(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    store_dir: str | Path,
    *,
    key: Mapping[str, str],
    task: str,
    shard_size: int = 256,
    include: Sequence[str] | None = None,
    batch_size: int = 16,
    device: str | torch.device = "auto",
    diffusion: Any = None,
    method: str = "auto",
    progress: Any = None,
    projection_dim: int | None = None,
) -> GradientStore:
    """Collects per-sample gradients into an on-disk store, reusing or resuming a previous run.

    The store lives in ``store_dir/<hash>`` where the hash covers ``key``, the task, the adapter
    blocks and their dtype, the diffusion settings and a fingerprint of ``examples``. Shards that
    are complete and pass their checksum are kept; the rest are (re)computed, one shard of
    ``shard_size`` samples at a time, each written atomically and then recorded in the manifest.

    Args:
        model: PEFT-adapted model (see :func:`datainf_core.gradients.collect_gradients`).
        examples: ``n`` examples for ``task``.
        store_dir: Parent folder of stores (e.g. the project's gradients folder).
        key: Strings describing model, adapter, data and settings (saved in the manifest).
        task: ``"classification"``, ``"generation"`` or ``"text-to-image"``.
        shard_size: Samples per shard file.
        include, batch_size, device, diffusion, method: As in ``collect_gradients``.
        progress: Called as ``progress(done, total)`` in samples (cached shards count as done).
        projection_dim: Store each block wider than this projected to this many dimensions
            (:mod:`datainf_core.projection`, seed 0: train and query stores share the matrices);
            None stores the gradients as they are.

    Returns:
        The complete :class:`GradientStore`.

    Raises:
        StoreError: ``shard_size`` is not positive, or the folder cannot be written.
    """
    folder, manifest, count = open_store_folder(
        model,
        examples,
        store_dir,
        key=key,
        task=task,
        shard_size=shard_size,
        include=include,
        diffusion=diffusion,
        projection_dim=projection_dim,
    )
    projection = store_projection(manifest)
    n = len(examples)
    # 1. Keep the shards whose file is present and matches its checksum.
    kept = verified_shards(folder, manifest, range(count))
    if len(kept) == count and manifest.get("complete"):
        logger.info("Gradient store cache hit: %s (%d samples)", folder, n)
        if progress is not None:
            progress(n, n)
        return GradientStore(folder, manifest)
    manifest["shards"] = [kept[i] for i in sorted(kept)]
    manifest["complete"] = False
    _write_json_atomic(folder / MANIFEST, manifest)
    # 2. Compute the missing shards in order, recording each one once its file is on disk.
    began = time.perf_counter()

    def record(index: int) -> None:
        manifest["shards"] = [kept[i] for i in sorted(kept)]
        manifest["complete"] = len(kept) == count
        _write_json_atomic(folder / MANIFEST, manifest)

    compute_missing_shards(
        model, examples, folder, range(count), kept, shard_size=shard_size, task=task,
        progress=progress, on_shard=record, include=include, batch_size=batch_size,
        device=device, diffusion=diffusion, method=method, projection=projection,
    )  # fmt: skip
    logger.info(
        "Gradient store %s written (%d samples, %d shards) in %.2f seconds",
        folder,
        n,
        count,
        time.perf_counter() - began,
    )
    return GradientStore(folder, manifest)


def open_store_folder(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    store_dir: str | Path,
    *,
    key: Mapping[str, str],
    task: str,
    shard_size: int = 256,
    include: Sequence[str] | None = None,
    diffusion: Any = None,
    projection_dim: int | None = None,
) -> tuple[Path, dict[str, Any], int]:
    """The store folder for these inputs, its manifest (read, or a fresh empty one) and shard count.

    Creates the folder; writes nothing else. Every process that computes shards of the same
    store (see :mod:`datainf_core.distributed`) gets the same folder and manifest from it.

    Raises:
        StoreError: ``shard_size`` is not positive, or the folder cannot be created.
    """
    from datainf_core.gradients import adapter_parameters

    if not isinstance(shard_size, int) or shard_size < 1:
        raise StoreError(f"shard_size should be a positive integer, got {shard_size!r}; pass 256")
    if projection_dim is not None and (not isinstance(projection_dim, int) or projection_dim < 1):
        raise StoreError(
            f"projection_dim should be a positive integer, got {projection_dim!r}; e.g. 4096"
        )
    n = len(examples)
    params = adapter_parameters(model, include)
    raw_blocks = {name: int(p.numel()) for name, p in params.items()}
    blocks = {name: min(d, projection_dim or d) for name, d in raw_blocks.items()}
    projection = None
    if projection_dim is not None:
        projection = {"dim": projection_dim, "seed": 0, "blocks": raw_blocks}
    full_key = {
        "key": {str(k): str(v) for k, v in key.items()},
        "task": task,
        "blocks": blocks,
        "dtype": str(next(iter(params.values())).dtype),
        "diffusion": None if diffusion is None else diffusion.describe(),
        "examples": examples_fingerprint(examples),
        "n": n,
        "shard_size": shard_size,
    }
    if projection is not None:  # absent otherwise, so stores written before keep their hash
        full_key["projection"] = projection
    digest = key_hash(full_key)
    folder = Path(store_dir) / digest[:20]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create gradient store folder {folder} ({exc.strerror}); pass a writable "
            "store_dir"
        ) from exc
    manifest = _read_manifest(folder)
    if manifest is None or manifest.get("hash") != digest:
        manifest = {
            "format": FORMAT_VERSION,
            "hash": digest,
            "key": full_key["key"],
            "task": task,
            "n": n,
            "shard_size": shard_size,
            "blocks": blocks,
            "examples": full_key["examples"],
            "diffusion": full_key["diffusion"],
            "projection": projection,
            "shards": [],
            "complete": False,
        }
    return folder, manifest, (n + shard_size - 1) // shard_size


def store_projection(manifest: Mapping[str, Any]) -> Any:
    """The random projection a store's manifest asks for (None for an unprojected store)."""
    if not manifest.get("projection"):
        return None
    from datainf_core.projection import make_projection

    spec = manifest["projection"]
    return make_projection(spec["blocks"], dim=int(spec["dim"]), seed=int(spec["seed"]))


def verified_shards(
    folder: Path, manifest: Mapping[str, Any], indices: Iterable[int]
) -> dict[int, dict[str, Any]]:
    """Shard index → manifest entry, for the ``indices`` whose file is present and intact."""
    wanted = set(indices)
    kept: dict[int, dict[str, Any]] = {}
    for shard in manifest["shards"]:
        if int(shard["index"]) not in wanted:
            continue
        if _shard_ok(folder, shard):
            kept[int(shard["index"])] = shard
        else:
            logger.warning("Gradient shard %s is missing or corrupt: recomputing it", shard["file"])
    return kept


def compute_shard(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    folder: Path,
    index: int,
    *,
    shard_size: int,
    task: str,
    projection: Any = None,
    **collect: Any,
) -> dict[str, Any]:
    """Collects and writes shard ``index`` (rows ``index * shard_size`` on); its manifest entry.

    Args:
        projection: A :class:`~datainf_core.projection.GradientProjection` applied before
            writing (:func:`store_projection`), or None.
        collect: ``include``, ``batch_size``, ``device``, ``diffusion``, ``method`` and
            ``progress`` of ``collect_gradients_and_losses``.
    """
    from datainf_core.gradients import collect_gradients_and_losses

    start, stop = index * shard_size, min(len(examples), (index + 1) * shard_size)
    grads, losses = collect_gradients_and_losses(model, examples[start:stop], task=task, **collect)
    if projection is not None:
        grads = projection.apply(grads)
    return _write_shard(folder, index, start, stop, grads, losses)


def compute_missing_shards(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    folder: Path,
    indices: Sequence[int],
    kept: dict[int, dict[str, Any]],
    *,
    shard_size: int,
    task: str,
    progress: Any = None,
    on_shard: Any = None,
    **collect: Any,
) -> dict[int, dict[str, Any]]:
    """Computes the shards of ``indices`` not in ``kept``, in order; adds their entries to it.

    Args:
        kept: Shard index → manifest entry of the shards already on disk (updated in place).
        progress: ``progress(done, total)`` in samples of ``indices`` (kept shards count as done).
        on_shard: Called with the index of each shard once its file is on disk.
        collect: The other arguments of :func:`compute_shard`.

    Returns:
        ``kept``.
    """
    total = sum(min(len(examples), (i + 1) * shard_size) - i * shard_size for i in indices)
    done = sum(int(kept[i]["stop"]) - int(kept[i]["start"]) for i in indices if i in kept)
    for index in indices:
        if index in kept:
            continue

        def shard_progress(rows: int, _total: int, offset: int = done) -> None:
            if progress is not None:
                progress(offset + rows, total)

        kept[index] = compute_shard(
            model, examples, folder, index, shard_size=shard_size, task=task,
            progress=shard_progress, **collect,
        )  # fmt: skip
        if on_shard is not None:
            on_shard(index)
        done += int(kept[index]["stop"]) - int(kept[index]["start"])
    return kept


def _write_shard(
    folder: Path,
    index: int,
    start: int,
    stop: int,
    grads: Mapping[str, torch.Tensor],
    losses: torch.Tensor,
) -> dict[str, Any]:
    """Writes one shard atomically; returns its manifest entry."""
    name = f"shard-{index:05d}.safetensors"
    tensors = {block: value.contiguous() for block, value in grads.items()}
    tensors[LOSS_KEY] = losses.to(torch.float32).contiguous()
    tmp = folder / (name + ".tmp")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, folder / name)
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # no half-written shard is left behind
        raise StoreError(
            f"cannot write gradient shard {folder / name} ({exc.strerror}); free disk space or "
            "pass another store_dir"
        ) from exc
    entry = _Shard(index, name, start, stop, _sha256_file(folder / name))
    return asdict(entry)
