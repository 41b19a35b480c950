"""Starting a run over several processes: ``datainf run DIR --nproc N``, or under torchrun.

Two ways in, one code path. ``--nproc N`` spawns N local processes (:func:`spawn_run`), each of
which sets the variables torchrun would set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) and runs the whole run as one rank. Under ``torchrun`` (one
machine or several) the variables are already there. Either way :func:`join_process_group` joins
the group with NCCL when the run's device is CUDA and gloo otherwise, with a timeout, so a rank
that never arrives gives a one-line error rather than a hang.

Every rank writes its own gradient shards into the project's store, so on several machines the
project folder must be on a shared file system.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

from datainf_core.errors import DataInfError

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "DATAINF_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600.0


class LaunchError(DataInfError):
    """Processes of a multi-process run could not start, meet, or finish."""


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (or :func:`spawn_run`); 1 when not launched that way."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as exc:
        raise LaunchError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; unset it or launch "
            "with torchrun"
        ) from exc


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size; ``(0, 1)`` outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def timeout_seconds() -> float:
    """How long a rank waits for the others (``DATAINF_DIST_TIMEOUT``, default one hour)."""
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError as exc:
        raise LaunchError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds; e.g. 600") from exc


def join_process_group(device: str = "auto") -> bool:
    """Joins the process group described by the torchrun variables, once.

    Args:
        device: The run's device; CUDA selects NCCL (and ``cuda:LOCAL_RANK``), else gloo.

    Returns:
        True when this call created the group (the caller destroys it), False when there is
        nothing to join (one process) or the group already exists.

    Raises:
        LaunchError: A variable is missing, or the other ranks did not arrive in time.
    """
    import torch
    import torch.distributed as dist

    from datainf_core.device import resolve_device

    world = launched_world_size()
    if world == 1 or dist.is_initialized():
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise LaunchError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun "
            "(it sets them) or unset WORLD_SIZE"
        )
    rank, timeout = int(os.environ["RANK"]), timeout_seconds()
    backend = "gloo"
    if resolve_device(device).type == "cuda":
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LaunchError(
            f"rank {rank} of {world} could not join the process group at {address} within "
            f"{timeout:g} s ({first}); start every rank with the same MASTER_ADDR/MASTER_PORT, "
            f"or raise {TIMEOUT_ENV}"
        ) from exc
    logger.info("rank %d of %d joined %s (%s)", rank, world, address, backend)
    return True


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank (e.g. the run id); ``text`` itself in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def leave_process_group() -> None:
    """Destroys the process group, if there is one."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(
    rank: int, world: int, port: int, project_root: str, settings: dict[str, Any], run_id: str
) -> None:
    """One spawned rank: the torchrun variables, then the whole run (``execute_run``)."""
    import torch

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from datainf_core.project import load_project
    from datainf_core.runs import RunSettings, execute_run

    execute_run(load_project(project_root), RunSettings.from_dict(settings), run_id=run_id)


def spawn_run(project_root: Path, settings: dict[str, Any], run_id: str, nproc: int) -> None:
    """Runs ``run_id`` with ``nproc`` local processes (ranks) and waits for them.

    Raises:
        LaunchError: A rank failed (its first error line), or died; the others are stopped.
    """
    import torch.multiprocessing as mp

    try:
        mp.spawn(
            _rank_main,
            args=(nproc, _free_port(), str(project_root), settings, run_id),
            nprocs=nproc,
            join=True,
        )
    except mp.ProcessRaisedException as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        last = re.sub(r"^(?:\w+\.)+(?=\w+: )", "", lines[-1]) if lines else "no message"
        raise LaunchError(f"rank {exc.error_index} of {nproc} failed: {last}") from None
    except mp.ProcessExitedException as exc:
        raise LaunchError(
            f"rank {exc.error_index} of {nproc} died (exit code {exc.exit_code}); run with "
            "--nproc 1 to see the error, or free memory"
        ) from None
