"""The ``datainf`` command (also ``python -m datainf_core``).

Subcommands: ``new``, ``info``, ``train``, ``run``, ``export``, ``demo {text,generation,image}``.
A user mistake (any :class:`~datainf_core.errors.DataInfError`) prints ``error: <message>`` on
stderr and exits with status 2, without a traceback; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from datainf_core.errors import DataInfError

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
TOP_SUSPECTS = 10


class _Parser(argparse.ArgumentParser):
    """argparse with one-line ``error: ...`` messages and exit status 2 (its default)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"error: {message}; see `{self.prog} --help`\n")


class _Bar:
    """A tqdm bar that follows ``progress(done, total[, stage])`` calls, one bar per stage."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.stage: str | None = None

    def __call__(self, done: int, total: int, stage: str | None = None) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None or stage != self.stage or total != self.bar.total:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage or "working", unit="it", leave=False)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---- subcommands -----------------------------------------------------------------------------
def _cmd_new(args: argparse.Namespace) -> int:
    from datainf_core.project import create_project

    settings = {
        key: getattr(args, key)
        for key in (
            "text_column",
            "label_column",
            "prompt_column",
            "response_column",
            "image_column",
            "caption_column",
            "category_column",
            "max_length",
            "dtype",
            "gguf_file",
            "loss_tokens",
            "batch_size",
        )
        if getattr(args, key) is not None
    }
    if args.labels:
        settings["labels"] = [label.strip() for label in args.labels.split(",") if label.strip()]
    if args.include:
        settings["include"] = args.include
    if args.trust_remote_code:
        settings["trust_remote_code"] = True
    if args.allow_pickle:
        settings["allow_pickle"] = True
    project = create_project(
        args.dir,
        name=args.name,
        task=args.task,
        base=args.base,
        adapter=args.adapter,
        train=args.train,
        validation=args.validation,
        **settings,
    )
    print(f"created {project.project_file}")
    if project.model.adapter is None:
        print(f"no adapter yet: run `datainf train {args.dir}` to fine-tune one")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from datainf_core import data, runs
    from datainf_core.project import load_project

    project = load_project(args.dir)
    print(f"project    {project.name} ({project.task}) in {project.root}")
    print(f"base       {project.base_location}")
    print(f"adapter    {project.adapter_path or '(none: run datainf train)'}")
    for split in ("train", "validation"):
        df = data.load_split(project, split)
        print(f"{split:<11}{len(df)} rows from {getattr(project, f'{split}_path')}")
        if project.task == "classification":
            counts = df[project.data.label_column].map(data.label_to_str).value_counts()
            shown = ", ".join(
                f"{label}: {counts.get(label, 0)}" for label in project.data.labels or []
            )
            print(f"           labels {shown}")
    listed = runs.list_runs(project)
    print(f"runs       {len(listed)}")
    for info in listed[:5]:
        print(f"  {info.run_id}  {info.state:<9} {', '.join(info.methods)}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from datainf_core import train
    from datainf_core.project import load_project

    project = load_project(args.dir, check_files=False)
    values = {
        key: getattr(args, key)
        for key in ("epochs", "rank", "alpha", "lr", "batch_size", "patience", "seed", "device")
        if getattr(args, key) is not None
    }
    if args.target_modules:
        values["target_modules"] = [
            name.strip() for name in args.target_modules.split(",") if name.strip()
        ]
    settings = train.TrainSettings(**values)
    bar = _Bar(not args.no_progress)
    started = time.perf_counter()
    try:
        result = train.train_adapter(project, settings, out_dir=args.out, progress=bar)
    finally:
        bar.close()
    print(f"adapter saved to {result.adapter_path} in {time.perf_counter() - started:.1f} s")
    if result.best_val_loss is not None:
        line = f"best validation loss {result.best_val_loss:.4f}"
        if result.val_accuracy is not None:
            line += f", validation accuracy {result.val_accuracy:.4f}"
        print(line)
    return 0


def _print_suspects(project: Any, signals: Any, count: int = TOP_SUSPECTS) -> None:
    from datainf_core import data

    df = data.load_split(project, "train")
    order = signals.sort_values("combined", ascending=False).head(count)
    column = {
        "classification": project.data.text_column,
        "generation": project.data.prompt_column,
        "text-to-image": project.data.caption_column,
    }[project.task]
    label = project.data.label_column if project.task == "classification" else None
    print(f"top {len(order)} suspects (combined ranking; higher = more suspicious):")
    for _, row in order.iterrows():
        index = int(row["train_index"])
        text = " ".join(str(df[column].iloc[index]).split())
        text = text if len(text) <= 60 else text[:57] + "..."
        shown = f"[{data.label_to_str(df[label].iloc[index])}] " if label else ""
        print(f"  {index:>6}  {row['combined']:.3f}  {shown}{text}")


def run_settings(args: argparse.Namespace) -> Any:
    """The :class:`~datainf_core.runs.RunSettings` of parsed ``datainf run`` options."""
    from datainf_core import runs

    return runs.RunSettings(
        methods=args.method or ["datainf"],
        per_query=args.per_query,
        damping=args.damping,
        device=args.device,
        loss_tokens=args.loss_tokens,
        self_influence=not args.no_self_influence,
        train_loss=not args.no_train_loss,
        nproc=args.nproc,
        projection_dim=args.projection_dim,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from datainf_core import evaluate, runs
    from datainf_core.project import load_project

    project = load_project(args.dir)
    settings = run_settings(args)
    rank = int(os.environ.get("RANK", "0") or 0)  # under torchrun only rank 0 reports
    bar = _Bar(not args.no_progress and rank == 0)
    started = time.perf_counter()
    try:
        folder = runs.execute_run(project, settings, run_id=args.run_id, progress=bar)
    finally:
        bar.close()
    if rank != 0:
        return 0
    print(f"run {folder.name} finished in {time.perf_counter() - started:.1f} s")
    print(f"results in {folder}")
    timings = runs.load_timings(project, folder.name)
    if timings:
        print(
            "stages: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timings.items())
        )
    evaluation = runs.load_evaluation(project, folder.name)
    if evaluation and evaluation.get("detection_auc"):
        aucs = ", ".join(f"{k} {v:.3f}" for k, v in evaluation["detection_auc"].items())
        print(f"detection AUC (is_noisy known): {aucs}")
    if evaluation and evaluation.get("fit"):
        print(evaluate.fit_message(evaluation["fit"]))
    if evaluation and evaluation.get("identification"):
        for method, metrics in evaluation["identification"].items():
            print(
                f"identification {method}: AUC {metrics['auc_mean']:.3f} ± {metrics['auc_std']:.3f}"
                f", recall {metrics['recall_mean']:.3f} ± {metrics['recall_std']:.3f}"
            )
    _print_suspects(project, runs.load_signals(project, folder.name), args.top)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from datainf_core import export
    from datainf_core.project import load_project

    project = load_project(args.dir)
    path = export.export_dataset(
        project,
        args.out,
        fmt=args.format,
        drop_excluded=args.drop_excluded,
        apply_relabels=args.apply_relabels,
        run_id=args.run_id,
    )
    print(f"exported to {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    bar = _Bar(not args.no_progress)
    started = time.perf_counter()
    try:
        if args.kind == "text":
            from datainf_core.demos.text import build_text_demo

            project = build_text_demo(
                args.dir,
                size=args.size,
                noise=args.noise,
                seed=args.seed,
                overfit=args.overfit,
                progress=bar,
            )
        elif args.kind == "generation":
            from datainf_core.demos import generation

            project = generation.build_generation_demo(args.dir, seed=args.seed, progress=bar)
        else:
            from datainf_core.demos import image

            project = image.build_image_demo(args.dir, seed=args.seed, progress=bar)
    finally:
        bar.close()
    root = getattr(project, "root", args.dir)
    print(f"{args.kind} demo built in {root} in {time.perf_counter() - started:.1f} s")
    print(f"next: datainf run {root} --method datainf")
    return 0


# ---- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every subcommand."""
    from datainf_core import __version__

    parser = _Parser(
        prog="datainf",
        description="Find the training samples that shaped a LoRA fine-tuned model (DataInf).",
    )
    parser.add_argument("--version", action="version", version=f"datainf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    new = sub.add_parser("new", help="create a project folder with project.toml")
    new.add_argument("dir", help="project folder (created if missing)")
    new.add_argument(
        "--task", required=True, choices=["classification", "generation", "text-to-image"]
    )
    new.add_argument("--base", required=True, help="base model: local folder or hub id")
    new.add_argument("--adapter", help="PEFT LoRA adapter folder (omit to train one later)")
    new.add_argument("--train", required=True, help="train file (csv/jsonl/parquet/imagefolder)")
    new.add_argument("--validation", required=True, help="validation file")
    new.add_argument("--name", help="project name (default: the folder name)")
    for column in ("text", "label", "prompt", "response", "image", "caption", "category"):
        new.add_argument(f"--{column}-column", metavar="C", help=f"{column} column name")
    new.add_argument("--labels", help="comma-separated label list, in class-index order")
    new.add_argument("--max-length", type=int, help="maximum tokens per sample (default 128)")
    new.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    new.add_argument("--gguf-file", help="GGUF file name inside the base folder")
    new.add_argument("--loss-tokens", choices=["prompt", "response", "all"])
    new.add_argument("--include", action="append", help="adapter tensor name pattern (repeatable)")
    new.add_argument("--batch-size", type=int, help="gradient batch size (default 16)")
    new.add_argument("--trust-remote-code", action="store_true", help="run the model's own code")
    new.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt checkpoints")
    new.set_defaults(func=_cmd_new)

    info = sub.add_parser("info", help="summarise a project: model, data, runs")
    info.add_argument("dir")
    info.set_defaults(func=_cmd_info)

    train = sub.add_parser("train", help="fine-tune a LoRA adapter and point the project at it")
    train.add_argument("dir")
    train.add_argument("--epochs", type=int)
    train.add_argument("--rank", type=int)
    train.add_argument("--alpha", type=float)
    train.add_argument("--lr", type=float)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--target-modules", help="comma-separated module names, e.g. query,value")
    train.add_argument("--patience", type=int, help="epochs without improvement before stopping")
    train.add_argument("--seed", type=int)
    train.add_argument("--device")
    train.add_argument("--out", help="adapter folder (default: inside the project)")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=_cmd_train)

    run = sub.add_parser("run", help="compute influence scores and mislabel signals")
    run.add_argument("dir")
    run.add_argument(
        "--method",
        action="append",
        help="datainf, exact, lissa or hessian_free, optionally with _cosine (repeatable); "
        "datainf_cosine and hessian_free_cosine are always scored too, for the combined ranking",
    )
    run.add_argument("--per-query", action="store_true", help="also score every validation query")
    run.add_argument("--damping", type=float, default=0.1)
    run.add_argument("--device", default="auto")
    run.add_argument("--loss-tokens", choices=["prompt", "response", "all"])
    run.add_argument("--no-self-influence", action="store_true")
    run.add_argument("--no-train-loss", action="store_true")
    run.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="local processes for gradients and scores (torch.distributed); under torchrun "
        "its world size applies",
    )
    run.add_argument(
        "--projection-dim",
        type=int,
        metavar="DIM",
        help="store gradients randomly projected to DIM dimensions per block (e.g. 4096), for "
        "stores too large to keep whole",
    )
    run.add_argument("--run-id", help=argparse.SUPPRESS)
    run.add_argument("--top", type=int, default=TOP_SUSPECTS, help="suspects to print")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=_cmd_run)

    export = sub.add_parser("export", help="write the reviewed, cleaned training set")
    export.add_argument("dir")
    export.add_argument("--format", choices=["csv", "jsonl", "parquet"])
    export.add_argument("--out", required=True, help="output file (never a source file)")
    export.add_argument("--drop-excluded", action="store_true")
    export.add_argument("--apply-relabels", action="store_true")
    export.add_argument("--run-id", help="run whose scores to add (default: the latest)")
    export.set_defaults(func=_cmd_export)

    demo = sub.add_parser("demo", help="build a built-in offline demo project")
    demo.add_argument("kind", choices=["text", "generation", "image"])
    demo.add_argument("dir")
    demo.add_argument("--size", type=int, default=2000, help="training samples (text demo)")
    demo.add_argument("--noise", type=float, default=0.2, help="share of flipped labels (text)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overfit", action="store_true", help="train until the noise is fit (text)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``datainf`` command; returns the exit status (0, 2 for user errors, 130)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad option (message already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    _configure_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except DataInfError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except OSError as exc:
        # Disk full, permission denied, ... : still a one-line message, not a traceback.
        print(
            f"error: {exc.strerror or exc} ({exc.filename or 'no file'}); check the path and free space",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
