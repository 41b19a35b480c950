"""BENCHMARKS.md writer: result JSONs from bench/results/ → tables, plots and the machine header.

Used by ``bench/run_all.py``; also importable on its own (the smoke test feeds it fake results).
Rendering is generic so that every benchmark script keeps its own JSON layout:

- a string (``"summary"``, ``"note"``) becomes a paragraph, a list of strings becomes bullets;
- a list of dicts (``"rows"``, ``"table"``, any key) becomes a markdown table;
- a dict of scalars becomes a two-column table, a dict of dicts of scalars a matrix table;
- a dict holding ``fraction_inspected`` and ``fraction_found`` lists is a detection curve (plotted);
- a ``{"__spread__": [...]}`` leaf (made by :func:`merge_repeats`) prints as ``median [min–max]``.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPREAD_KEY = "__spread__"
MAX_TABLE_ROWS = 40
VERSIONED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "diffusers",
    "numpy",
    "pandas",
    "scikit-learn",
    "plotly",
    "kaleido",
    "kronfluence",
    "dattri",
)


# Sections in report order: result name, title, what it measures.
SECTIONS: tuple[tuple[str, str, str], ...] = (
    (
        "engine",
        "1. Influence engine",
        "This engine vs a plain engine that loops over samples and blocks in Python the way the "
        "published DataInf code does (same formulas), aggregate and per-query, on random "
        "gradients; peak memory and the memory-bandwidth floor.",
    ),
    (
        "memory",
        "1b. Engine memory and processes",
        "Peak RSS as n grows at fixed gradient width, and 1 vs 2 processes.",
    ),
    (
        "gradients",
        "2. Per-sample gradients",
        "Batched per-sample gradients vs a batch-of-one loop vs the floor (one ordinary "
        "forward + backward over the same samples in mini-batches).",
    ),
    (
        "text_demo",
        "3a. Mislabel detection on the text demo",
        "Detection AUC of every signal on the offline text demo (20% flipped labels), in the "
        "default and overfit regimes, and the retraining experiment.",
    ),
    (
        "fidelity",
        "3b. Fidelity to Exact across LoRA ranks (the paper's Figure 1 at CPU scale)",
        "Pearson correlation of each method's aggregate scores with the Exact method's, for "
        "MiniLM LoRA adapters of rank 1, 2, 4 and 8 trained on a small text demo. The paper "
        "(RoBERTa-large on MRPC, r = 1) reports DataInf 0.64, Hessian-free 0.50, LiSSA 0.45.",
    ),
    (
        "identification",
        "3c. Identification on the generation and image demos (the paper's Table 2)",
        "For each query, ROC-AUC and recall of same-category training samples among the most "
        "helpful, averaged over queries; several seeds.",
    ),
    (
        "peers",
        "4. Peers: kronfluence and dattri on the same text demo project",
        "kronfluence (EK-FAC and identity curvature) and dattri's DataInf, installed from PyPI, "
        "on the same adapter, data and queries as this engine: wall time and detection AUC.",
    ),
    (
        "scaleout",
        "1c. Several processes and random projection",
        "A whole run (gradients and scores) with 1 and 2 processes on the same project, and the "
        "rank correlation of scores on randomly projected gradients with unprojected ones on "
        "the text demo.",
    ),
    (
        "review_load",
        "4b. Review actions on a 100,000-row project",
        "Seconds per review action (store write plus the Review page's rerun), with an empty "
        "review database and with half the rows decided; target under 1 s.",
    ),
    (
        "gpu",
        "5. GPU",
        "The same command fills this section when CUDA is present.",
    ),
)


# ---------------------------------------------------------------------------------------------
# Repeats
# ---------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def merge_repeats(runs: Sequence[Any]) -> Any:
    """Merges the JSON of repeated runs: numeric leaves that differ become spread leaves.

    Args:
        runs: Two or more JSON values of the same layout (one per repeat).

    Returns:
        The first run's layout, where each numeric leaf that differs between runs is replaced by
        ``{"__spread__": [value per run]}``. Anything whose layout differs is taken from run 1.
    """
    first = runs[0]
    if len(runs) == 1:
        return first
    if all(_is_number(run) for run in runs):
        values = [float(run) for run in runs]
        return first if len(set(values)) == 1 else {SPREAD_KEY: values}
    if isinstance(first, dict) and all(isinstance(run, dict) for run in runs):
        return {
            key: merge_repeats([run[key] for run in runs]) if all(key in r for r in runs) else value
            for key, value in first.items()
        }
    if isinstance(first, list) and all(
        isinstance(run, list) and len(run) == len(first) for run in runs
    ):
        return [merge_repeats([run[i] for run in runs]) for i in range(len(first))]
    return first


def spread_values(value: Any) -> list[float] | None:
    """The per-repeat values of a spread leaf, or None for anything else."""
    if isinstance(value, dict) and set(value) == {SPREAD_KEY}:
        return [float(v) for v in value[SPREAD_KEY]]
    return None


def central(value: Any) -> Any:
    """A spread leaf's median, or the value itself."""
    values = spread_values(value)
    if values is None:
        return value
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def format_number(value: float) -> str:
    """Three significant figures for small values, thousands separators for large ones."""
    if isinstance(value, int) or (float(value).is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.01:
        return f"{value:.3g}"
    return f"{value:.2e}"


def format_value(value: Any) -> str:
    """A table cell: numbers, spread leaves, booleans, short lists; pipes escaped."""
    values = spread_values(value)
    if values is not None:
        low, high = min(values), max(values)
        return f"{format_number(central(value))} [{format_number(low)}–{format_number(high)}]"
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if _is_number(value):
        return format_number(value)
    if isinstance(value, list) and all(_is_number(v) or isinstance(v, str) for v in value):
        shown = ", ".join(format_value(v) for v in value[:8])
        return shown + (", …" if len(value) > 8 else "")
    if isinstance(value, dict | list):
        text = json.dumps(value, default=str)
        return (text[:80] + "…" if len(text) > 80 else text).replace("|", "\\|")
    return str(value).replace("|", "\\|").replace("\n", " ")


def _is_scalar(value: Any) -> bool:
    return (
        value is None
        or isinstance(value, str | bool)
        or _is_number(value)
        or spread_values(value) is not None
        or (isinstance(value, list) and len(value) <= 8 and all(_is_number(v) for v in value))
    )


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A markdown table of ``rows`` (dicts); columns are the union of keys in first-seen order."""
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(key for key in row if key not in columns)
    shown = list(rows[:MAX_TABLE_ROWS])
    lines = [
        "| " + " | ".join(str(c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(format_value(row.get(c)) for c in columns) + " |" for row in shown]
    if len(rows) > len(shown):
        lines.append(f"\n({len(rows) - len(shown)} more rows in the JSON)")
    return "\n".join(lines)


def _is_curve(value: Any) -> bool:
    return isinstance(value, dict) and "fraction_inspected" in value and "fraction_found" in value


def _is_matrix(value: Mapping[str, Any]) -> bool:
    return bool(value) and all(
        isinstance(inner, dict) and inner and all(_is_scalar(v) for v in inner.values())
        for inner in value.values()
    )


def _flatten(record: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Scalar leaves of a nested dict keyed by their path (curves and long lists left out)."""
    flat: dict[tuple[str, ...], Any] = {}
    for key, value in record.items():
        path = (*prefix, str(key))
        if _is_scalar(value):
            flat[path] = value
        elif isinstance(value, dict) and not _is_curve(value):
            flat.update(_flatten(value, path))
    return flat


def _is_records(value: Any) -> bool:
    """A dict of two or more nested dicts (e.g. one per seed or run) that is not a matrix."""
    return (
        isinstance(value, dict)
        and len(value) >= 2
        and all(isinstance(v, dict) and not _is_curve(v) for v in value.values())
        and not _is_matrix(value)
    )


def render_records(records: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One table per group of leaves sharing a parent path; a row per record."""
    flat = {key: _flatten(record) for key, record in records.items()}
    groups: dict[tuple[str, ...], list[str]] = {}
    for leaves in flat.values():
        for path in leaves:
            names = groups.setdefault(path[:-1], [])
            if path[-1] not in names:
                names.append(path[-1])
    blocks: list[str] = []
    for parent, names in groups.items():
        rows = [
            {"": key, **{leaf: flat[key].get((*parent, leaf)) for leaf in names}} for key in records
        ]
        if len(names) > 12:  # wide: records as columns instead
            rows = [
                {"": leaf, **{key: flat[key].get((*parent, leaf)) for key in records}}
                for leaf in names
            ]
        if parent:
            blocks.append(f"*{'.'.join(parent)}*")
        blocks.append(markdown_table(rows))
    return blocks


def render_json(data: Any, *, heading_level: int = 3, name: str = "") -> list[str]:
    """Markdown blocks for one benchmark's JSON (generic, see the module docstring)."""
    blocks: list[str] = []
    hashes = "#" * min(heading_level, 6)
    if isinstance(data, str):
        return [data if "\n" not in data or data.lstrip().startswith("|") else f"```\n{data}\n```"]
    if isinstance(data, list):
        if data and all(isinstance(item, dict) for item in data):
            if all(all(_is_scalar(v) for v in item.values()) for item in data):
                return [markdown_table(data)]
            for i, item in enumerate(data):
                blocks.append(f"{hashes} {name or 'item'} {i + 1}")
                blocks += render_json(item, heading_level=heading_level + 1)
            return blocks
        if data and all(isinstance(item, str) for item in data):
            return ["\n".join(f"- {item}" for item in data)]
        return [format_value(data)]
    if not isinstance(data, dict):
        return [format_value(data)]
    if _is_curve(data):
        return ["(detection curve: see the plot)"]
    texts = {k: v for k, v in data.items() if isinstance(v, str) and (" " in v or "\n" in v)}
    scalars = {k: v for k, v in data.items() if _is_scalar(v) and k not in texts}
    for key in ("summary", "note", "notes", "markdown"):
        if key in texts:
            blocks += render_json(texts.pop(key))
        elif isinstance(data.get(key), list) and all(isinstance(v, str) for v in data[key]):
            blocks += render_json(data[key])
    if scalars:
        blocks.append(
            markdown_table(
                [{"field": k, "value": v} for k, v in scalars.items()], ["field", "value"]
            )
        )
    for key, text in texts.items():
        blocks.append(f"*{key}*: {text}")
    for key, value in data.items():
        if key in scalars or key in texts or key in ("summary", "note", "notes", "markdown"):
            continue
        if _is_curve(value):
            continue
        if isinstance(value, dict) and value and all(_is_curve(v) for v in value.values()):
            blocks.append(f"{hashes} {key}\n\n(detection curves: see the plot)")
            continue
        blocks.append(f"{hashes} {key}")
        if isinstance(value, dict) and _is_matrix(value):
            blocks.append(markdown_table([{"": row, **inner} for row, inner in value.items()]))
        elif _is_records(value):
            blocks += render_records(value)
        else:
            blocks += render_json(value, heading_level=heading_level + 1, name=key)
    return blocks


# ---------------------------------------------------------------------------------------------
# Machine and versions
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit(repo: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names: Iterable[str] = VERSIONED_PACKAGES) -> dict[str, str]:
    """Installed version of each package, or "not installed"."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def describe_machine(repo: Path | None = None) -> dict[str, Any]:
    """CPU model, cores, RAM, OS, CUDA device (if any), git commit and the date (UTC)."""
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except ImportError:
        pass
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "gpu": gpu,
        "commit": _git_commit(repo or Path.cwd()),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def find_curves(data: Any, prefix: str = "") -> dict[str, dict[str, list[float]]]:
    """Every detection curve inside a JSON value, keyed by its path (``a/b/c``)."""
    found: dict[str, dict[str, list[float]]] = {}
    if _is_curve(data):
        found[prefix or "curve"] = {
            "fraction_inspected": [float(central(v)) for v in data["fraction_inspected"]],
            "fraction_found": [float(central(v)) for v in data["fraction_found"]],
        }
    elif isinstance(data, dict):
        for key, value in data.items():
            found.update(find_curves(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found.update(find_curves(value, f"{prefix}/{i}" if prefix else str(i)))
    return found


def _figures(results: Mapping[str, Any]) -> dict[str, Any]:
    """Plotly figures by file stem, from whatever results are present."""
    import plotly.graph_objects as go

    figures: dict[str, Any] = {}
    fidelity = results.get("fidelity")
    if isinstance(fidelity, dict) and isinstance(fidelity.get("rows"), list):
        fig = go.Figure()
        methods = sorted({row["method"] for row in fidelity["rows"] if "method" in row})
        for method in methods:
            rows = [r for r in fidelity["rows"] if r.get("method") == method and "pearson" in r]
            if not rows:
                continue
            fig.add_trace(
                go.Scatter(
                    x=[r["rank"] for r in rows],
                    y=[central(r["pearson"]) for r in rows],
                    mode="lines+markers",
                    name=method,
                )
            )
        paper = fidelity.get("paper_r1") or {}
        if paper:
            fig.add_trace(
                go.Scatter(
                    x=[1] * len(paper),
                    y=list(paper.values()),
                    text=list(paper),
                    mode="markers+text",
                    textposition="middle right",
                    marker={"symbol": "x", "size": 10, "color": "black"},
                    name="paper, r=1 (MRPC)",
                )
            )
        fig.update_layout(
            title="Correlation with Exact vs LoRA rank (text demo, MiniLM)",
            xaxis={"title": "LoRA rank r", "type": "log", "tickvals": [1, 2, 4, 8]},
            yaxis={"title": "Pearson correlation with Exact"},
        )
        figures["fidelity"] = fig
    peers = results.get("peers")
    if isinstance(peers, dict) and isinstance(peers.get("rows"), list):
        rows = [r for r in peers["rows"] if r.get("auc") is not None]
        if rows:
            labels = [f"{r.get('tool', '')}: {r.get('method', '')}" for r in rows]
            fig = go.Figure(go.Bar(x=labels, y=[central(r["auc"]) for r in rows]))
            fig.update_layout(
                title="Detection AUC on the text demo", yaxis={"title": "AUC", "range": [0, 1]}
            )
            figures["peers_auc"] = fig
            fig = go.Figure(go.Bar(x=labels, y=[central(r.get("seconds")) for r in rows]))
            fig.update_layout(title="Wall time (s), same project", yaxis={"title": "seconds"})
            figures["peers_time"] = fig
    for name, data in results.items():
        curves = find_curves(data)
        if not curves:
            continue
        fig = go.Figure()
        for label, curve in curves.items():
            fig.add_trace(
                go.Scatter(
                    x=curve["fraction_inspected"],
                    y=curve["fraction_found"],
                    mode="lines",
                    name=label,
                )
            )
        fig.add_trace(
            go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="random", line={"dash": "dot"})
        )
        fig.update_layout(
            title=f"Detection curve ({name})",
            xaxis={"title": "fraction of training data inspected"},
            yaxis={"title": "fraction of flipped labels found"},
        )
        figures[f"{name}_detection_curve"] = fig
    return figures


def save_plots(results: Mapping[str, Any], plots_dir: Path) -> tuple[dict[str, Path], str]:
    """Writes PNG plots with plotly + kaleido (matplotlib if kaleido fails).

    Returns:
        The written files by stem, and a sentence saying which renderer was used or why none.
    """
    try:
        figures = _figures(results)
    except ImportError as error:
        return {}, f"no plots: plotly is not importable ({error})"
    except (KeyError, TypeError, ValueError) as error:  # a result layout the plots do not know
        logger.warning("plots skipped: %s", error)
        return {}, f"no plots: a result did not have the expected layout ({error!r})"
    if not figures:
        return {}, "no plots: no plottable results"
    plots_dir.mkdir(parents=True, exist_ok=True)
    paths = {stem: plots_dir / f"{stem}.png" for stem in figures}
    try:
        import plotly.io as pio

        pio.write_images(list(figures.values()), [str(p) for p in paths.values()], scale=1.5)
        return paths, "PNG written by plotly + kaleido"
    except Exception as error:  # kaleido needs a Chrome/Chromium; fall back below
        reason = f"kaleido failed ({type(error).__name__}: {str(error)[:120]})"
    try:
        return _save_with_matplotlib(figures, paths), f"PNG written by matplotlib; {reason}"
    except ImportError:
        return {}, f"no plots: {reason}, and matplotlib is not installed"


def _save_with_matplotlib(figures: Mapping[str, Any], paths: Mapping[str, Path]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for stem, fig in figures.items():
        ax = plt.figure(figsize=(7, 4)).gca()
        for trace in fig.data:
            if trace.type == "bar":
                ax.bar(list(trace.x), list(trace.y))
                ax.tick_params(axis="x", rotation=30)
            else:
                ax.plot(list(trace.x), list(trace.y), marker="o", label=trace.name)
                ax.legend(fontsize=7)
        ax.set_title(fig.layout.title.text or stem)
        plt.tight_layout()
        plt.savefig(paths[stem], dpi=110)
        plt.close("all")
    return dict(paths)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def load_results(results_dir: Path) -> dict[str, Any]:
    """Every ``<name>.json`` in ``results_dir`` (``run_all.json`` and repeats excluded)."""
    results: dict[str, Any] = {}
    for path in sorted(results_dir.glob("*.json")):
        if path.stem == "run_all" or ".repeat" in path.stem:
            continue
        try:
            results[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("skipping unreadable result %s: %s", path, error)
    return results


def _status_line(outcome: Mapping[str, Any] | None, written: str | None = None) -> str:
    if not outcome:
        return "*Not run by run_all in this report; result file read as found.*"
    if written is not None and (
        written.endswith("*")  # newer than run_all's record
        or (outcome.get("status") != "ok" and written > str(outcome.get("result_time") or ""))
    ):  # run on its own (e.g. with a longer budget) after run_all's attempt
        written = written.rstrip("*")
        return (
            f"*Result written by a standalone run of the script at {written}, after run_all's "
            f"attempt recorded in run_all.json ({outcome.get('status', 'unknown')}"
            + (f", `{outcome['command']}`" if outcome.get("command") else "")
            + ").*"
        )
    status = outcome.get("status", "unknown")
    seconds = outcome.get("seconds") or []
    timing = ", ".join(f"{s:.0f} s" for s in seconds)
    repeats = outcome.get("repeats", 1)
    text = f"*Status: {status}; wall time {timing or '–'}"
    if outcome.get("command"):
        text += f"; `{outcome['command']}`"
    if outcome.get("threads"):
        text += f"; {outcome['threads']} thread(s) (OMP_NUM_THREADS)"
    if outcome.get("load_before") is not None:
        text += f"; load average {outcome['load_before']:.2f} when it started"
    text += (
        f"; {repeats} runs, numbers shown as median [min–max] where they differ, text from run 1*"
        if repeats > 1
        else "*"
    )
    if outcome.get("stale"):
        text += f"\n\n**Stale**: this run did not produce a result; the figures below are from an earlier run ({outcome.get('result_time', 'unknown time')})."
    if status not in ("ok", "missing") and outcome.get("error_tail"):
        text += "\n\n```\n" + str(outcome["error_tail"])[-1500:] + "\n```"
    return text


def build_report(
    results: Mapping[str, Any],
    *,
    machine: Mapping[str, Any],
    versions: Mapping[str, str],
    outcomes: Mapping[str, Mapping[str, Any]] | None = None,
    plots: Mapping[str, Path] | None = None,
    plot_note: str = "",
    report_dir: Path | None = None,
    command: str = ".venv/bin/python bench/run_all.py",
    written: Mapping[str, str] | None = None,
) -> str:
    """The BENCHMARKS.md text.

    Args:
        results: Benchmark name → its JSON (possibly merged over repeats).
        machine: From :func:`describe_machine`.
        versions: From :func:`package_versions`.
        outcomes: Benchmark name → run_all's record (status, seconds, repeats, error_tail, stale).
        plots: Plot stem → PNG path, linked relative to ``report_dir``.
        plot_note: How the plots were made (or why there are none).
        report_dir: Folder of BENCHMARKS.md, for relative links.
        command: The command that produced the report.
        written: Benchmark name → when its result file was written (``%Y-%m-%d %H:%M UTC``),
            for results written after run_all's record (standalone runs of a script).
    """
    outcomes = outcomes or {}
    plots = dict(plots or {})
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on {machine.get('date', '?')} (commit {machine.get('commit', '?')}). "
        "Every figure below comes from this one run on this one machine; ratios are only "
        "meaningful within it. Re-run the command to refresh the whole file.",
        "",
        "## Machine",
        "",
        markdown_table(
            [
                {"": "CPU", "value": machine.get("cpu")},
                {"": "cores", "value": machine.get("cores")},
                {"": "RAM (GiB)", "value": machine.get("ram_gib")},
                {"": "OS", "value": machine.get("os")},
                {"": "GPU", "value": machine.get("gpu")},
            ]
        ),
        "",
        "## Versions",
        "",
        markdown_table([versions]),
        "",
    ]
    if plot_note:
        lines += [f"Plots: {plot_note}.", ""]
    known = [name for name, _, _ in SECTIONS]
    # Only run_all's benchmarks: other JSON files in the folder (scratch, helpers) stay out.
    sections = list(SECTIONS) + [
        (name, f"Other: {name}", "") for name in sorted(outcomes) if name not in known
    ]
    for name, title, what in sections:
        lines += [f"## {title}", ""]
        if what:
            lines += [what, ""]
        outcome = outcomes.get(name)
        data = results.get(name)
        if data is None:
            if outcome:
                lines += [_status_line(outcome), ""]
            else:
                lines += ["*No result: the benchmark was not run or wrote no JSON.*", ""]
            continue
        when = (written or {}).get(name)
        lines += [_status_line(outcome, when), "", f"Source: `bench/results/{name}.json`.", ""]
        for block in render_json(data, heading_level=3):
            lines += [block, ""]
        for stem, path in plots.items():
            if stem == name or stem.startswith(f"{name}_"):
                rel = os.path.relpath(path, report_dir) if report_dir else str(path)
                lines += [f"![{stem}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _written_after_record(results_dir: Path, slack_s: float = 30.0) -> dict[str, str]:
    """Benchmark name → when its result file was written; ``*`` marks files newer than
    run_all's record (bench/results/run_all.json)."""
    record = results_dir / "run_all.json"
    since = record.stat().st_mtime + slack_s if record.exists() else float("inf")
    out = {}
    for path in results_dir.glob("*.json"):
        mtime = path.stat().st_mtime
        stamp = dt.datetime.fromtimestamp(mtime, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        out[path.stem] = stamp + ("*" if mtime > since else "")
    return out


def write_report(
    results_dir: Path,
    out_path: Path,
    *,
    plots_dir: Path | None = None,
    outcomes: Mapping[str, Mapping[str, Any]] | None = None,
    machine: Mapping[str, Any] | None = None,
    versions: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Reads every result JSON in ``results_dir`` and writes the report to ``out_path``.

    Args:
        results_dir: Folder with ``<name>.json`` files.
        out_path: Where BENCHMARKS.md goes (written atomically).
        plots_dir: Folder for PNG plots; None skips plotting.
        outcomes: run_all's record per benchmark (see :func:`build_report`).
        machine: Machine description; measured here when None.
        versions: Package versions; read here when None.
        progress: Optional callable receiving a short status line.

    Returns:
        ``out_path``.
    """
    results = load_results(results_dir)
    plots: dict[str, Path] = {}
    note = "not requested"
    if plots_dir is not None:
        if progress:
            progress("writing plots")
        plots, note = save_plots(results, plots_dir)
    text = build_report(
        results,
        machine=machine or describe_machine(out_path.parent),
        versions=versions or package_versions(),
        outcomes=outcomes,
        plots=plots,
        plot_note=note,
        report_dir=out_path.parent,
        written=_written_after_record(results_dir),
    )
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(out_path)
    return out_path
