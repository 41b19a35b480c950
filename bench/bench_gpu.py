"""GPU section: the engine and per-sample gradients on CUDA vs this machine's CPU.

With no CUDA device it writes a result that says so (and nothing else). With one:
1. engine: compute_influence on random gradients (24 blocks of 8 x 384, as bench_engine), each
   method, aggregate and per-query (m = 32), n = 10,000 and 100,000 on CUDA, n = 10,000 on CPU;
2. gradients: per-sample gradients of the small text-demo project (MiniLM + LoRA r=8) on CUDA vs
   CPU, and the floor (one ordinary forward + backward per mini-batch) on CUDA.
Writes bench/results/gpu.json.

    .venv/bin/python bench/bench_gpu.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import textbench  # noqa: E402

BLOCKS, ROWS, COLS = 24, 8, 384


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, device: torch.device, repeats: int = 3) -> float:
    """Best of ``repeats`` wall times after one warm-up call."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return best


def engine_rows(sizes: dict[str, list[int]], m: int) -> list[dict[str, Any]]:
    """compute_influence timings per device, n, method and mode."""
    from datainf_core.influence import METHODS, compute_influence

    rows = []
    for device_name, ns in sizes.items():
        device = torch.device(device_name)
        for n in ns:
            gen = torch.Generator().manual_seed(n)
            train = {
                f"b{i}": torch.randn(n, ROWS * COLS, generator=gen).to(device)
                for i in range(BLOCKS)
            }
            query = {
                k: torch.randn(m, v.shape[1], generator=gen).to(device) for k, v in train.items()
            }
            for method in METHODS:
                for mode in ("mean", None):
                    if method in ("exact", "lissa") and n > 10_000:
                        continue
                    seconds = _timed(
                        lambda method=method, mode=mode, train=train, query=query: (
                            compute_influence(train, query, method=method, aggregate=mode)
                        ),
                        device,
                        repeats=2 if method == "lissa" else 3,
                    )
                    rows.append(
                        {
                            "device": device_name,
                            "n": n,
                            "m": m,
                            "method": method,
                            "mode": "aggregate" if mode else "per-query",
                            "seconds": seconds,
                        }
                    )
            train = query = {}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def gradient_rows(size: int) -> list[dict[str, Any]]:
    """Per-sample gradients of the small text demo on CUDA and CPU, and the CUDA floor."""
    from datainf_core.batching import collate_examples
    from datainf_core.gradients import collect_gradients

    project, _ = textbench.text_project(size, rank=8)
    inputs = textbench.load_inputs(project)
    examples = inputs.train_examples
    rows = []
    for device_name in ("cuda", "cpu"):
        device = torch.device(device_name)
        model = inputs.model.to(device)
        seconds = _timed(
            lambda model=model, device_name=device_name: collect_gradients(
                model, examples, task="classification", batch_size=32, device=device_name
            ),
            device,
            repeats=1 if device_name == "cpu" else 3,
        )
        rows.append(
            {
                "device": device_name,
                "what": "per-sample gradients",
                "n": len(examples),
                "seconds": seconds,
            }
        )
    model = inputs.model.to("cuda")
    pad = getattr(inputs.tokenizer, "pad_token_id", None) or 0

    def floor() -> None:
        for start in range(0, len(examples), 32):
            batch = collate_examples(examples[start : start + 32], pad_token_id=pad)
            batch = {k: v.to("cuda") for k, v in batch.items()}
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    rows.append(
        {
            "device": "cuda",
            "what": "floor: forward + backward per mini-batch",
            "n": len(examples),
            "seconds": _timed(floor, torch.device("cuda")),
        }
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=600, help="text demo size for gradients")
    args = parser.parse_args(argv)
    textbench.quiet()
    if not torch.cuda.is_available():
        result: dict[str, Any] = {
            "available": False,
            "note": "no CUDA device on this machine",
            "torch": torch.__version__,
            "torch_cuda_build": torch.version.cuda,
        }
    else:
        result = {
            "available": True,
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "torch_cuda_build": torch.version.cuda,
            "engine": engine_rows({"cuda": [10_000, 100_000], "cpu": [10_000]}, m=32),
        }
        try:
            result["gradients"] = gradient_rows(args.size)
        except Exception as error:  # the engine figures stand on their own
            result["gradients_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    path = textbench.write_result("gpu", result)
    print(result.get("note") or f"GPU results for {result['device']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
