"""Draw the benchmark figures from the JSON results of runtime.py and planning.py.

speedup.png: int8 speed-up over fp32 against sequence length, one line per method and one panel per
thread count, from the rows of runtime.json ({"threads", "seq_len", "method", "ms_min", "ms_median",
"ms_max", "speedup"}).

planning.png: median planning and torch.export time against layer count, with min-max bars, and
the peak memory growth of each when planning.py measured it, from the rows of planning.json. The
GPT-2 shapes are joined by lines; other models are drawn as separate points with their name.

A results file is either a list of rows or an object with a "rows" list. A figure whose results
file does not exist is skipped with a message; the script fails when it writes no figure.

    python benchmarks/plots.py [--runtime benchmarks/results/runtime.json] [--planning benchmarks/results/planning.json]
                               [--out-dir docs/img]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # writes files without a display, so it must be chosen before pyplot is imported
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

RESULTS = Path(__file__).parent / "results"
RUNTIME_KEYS = ("threads", "seq_len", "method", "speedup")
PLANNING_KEYS = ("model", "layers", "export_s", "plan_s")


def load_rows(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Read the rows of a results file and check that each has the ``required`` keys.

    Raises:
        ValueError: the file is not JSON, contains no rows, or a row lacks a required key.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    rows = document.get("rows") if isinstance(document, dict) else document
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty list of rows, or an object with a non-empty \"rows\" list")
    for index, row in enumerate(rows):
        missing = [key for key in required if key not in row]
        if missing:
            raise ValueError(f"{path}: row {index} has no {', '.join(missing)}. Expected keys: {', '.join(required)}")
    return rows


def _label_best(axis: Axes, rows: list[dict[str, Any]]) -> None:
    """Write the best speed-up at each length above its point. Only one label per length, because
    the methods lie close together and their labels would overlap; the tables give every number."""
    for length in {row["seq_len"] for row in rows}:
        best = max(row["speedup"] for row in rows if row["seq_len"] == length)
        axis.annotate(f"{best:.2f}x", (length, best), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)


def plot_speedup(rows: list[dict[str, Any]], output: Path) -> None:
    """Write speedup.png: speed-up against sequence length per method, one panel per thread count."""
    thread_counts = sorted({row["threads"] for row in rows})
    methods = list(dict.fromkeys(row["method"] for row in rows))  # first-seen order, as runtime.py prints them
    seq_lens = sorted({row["seq_len"] for row in rows})
    top = max(row["speedup"] for row in rows)

    figure, axes = plt.subplots(1, len(thread_counts), figsize=(5.2 * len(thread_counts), 4.8), sharey=True, squeeze=False)
    for axis, threads in zip(axes[0], thread_counts):
        for method in methods:
            points = sorted((row["seq_len"], row["speedup"]) for row in rows if row["threads"] == threads and row["method"] == method)
            if not points:
                continue
            lengths, speedups = zip(*points)
            axis.plot(lengths, speedups, marker="o", label=method)
        _label_best(axis, [row for row in rows if row["threads"] == threads])
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axis.set_xscale("log", base=2)
        axis.set_xticks(seq_lens, [str(length) for length in seq_lens])
        axis.minorticks_off()
        axis.set_ylim(0, top * 1.15)
        axis.set_title(f"{threads} thread{'s' if threads != 1 else ''}")
        axis.set_xlabel("sequence length (tokens)")
        axis.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("speed-up over fp32 (fp32 median / median)")
    # Below the panels, where it covers no line.
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    figure.suptitle("GPT-2 small int8 forward latency: speed-up over fp32 (batch 1)")
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(output, dpi=150)
    plt.close(figure)


def _time_series(axis: Axes, rows: list[dict[str, Any]], key: str, label: str, color: str, joined: bool) -> None:
    layers = [row["layers"] for row in rows]
    medians = [row[key]["median"] for row in rows]
    below = [row[key]["median"] - row[key]["min"] for row in rows]
    above = [row[key]["max"] - row[key]["median"] for row in rows]
    axis.errorbar(layers, medians, yerr=[below, above], marker="o" if joined else "s", capsize=3, color=color,
                  linestyle="-" if joined else "none", label=label)


def _memory_series(axis: Axes, rows: list[dict[str, Any]], key: str, label: str, color: str, joined: bool) -> None:
    points = [(row["layers"], row[key]["growth_mb"]) for row in rows if row.get(key)]
    if points:
        layers, megabytes = zip(*points)
        axis.plot(layers, megabytes, marker="o" if joined else "s", color=color, linestyle="-" if joined else "none",
                  label=label)


def plot_planning(rows: list[dict[str, Any]], output: Path) -> None:
    """Write planning.png: export and plan seconds against layers, and their peak memory growth if measured."""
    gpt2 = sorted((row for row in rows if row["model"].startswith("gpt2")), key=lambda row: row["layers"])
    others = [row for row in rows if not row["model"].startswith("gpt2")]
    has_memory = any(row.get("plan_memory") or row.get("export_memory") for row in rows)
    colors = {"export": "tab:blue", "plan": "tab:orange"}

    figure, axes = plt.subplots(1, 2 if has_memory else 1, figsize=(11 if has_memory else 6, 4.4), squeeze=False)
    time_axis = axes[0][0]
    for group, joined, suffix in ((gpt2, True, "GPT-2"), (others, False, "other models")):
        if not group:
            continue
        _time_series(time_axis, group, "export_s", f"torch.export alone ({suffix})", colors["export"], joined)
        _time_series(time_axis, group, "plan_s", f"planner.plan ({suffix})", colors["plan"], joined)
    for row in rows:
        time_axis.annotate(f"{row['model']}\n{row['ratio']:.2f}x", (row["layers"], row["plan_s"]["median"]),
                           textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
    time_axis.set_xlabel("layers (transformer blocks)")
    time_axis.set_ylabel("time (s), median with min-max")
    time_axis.set_title("time; labels: model, plan / export")
    time_axis.set_ylim(0, 1.3 * max(row["plan_s"]["max"] for row in rows))
    time_axis.set_xlim(0, 1.12 * max(row["layers"] for row in rows))
    time_axis.grid(True, alpha=0.3)
    time_axis.legend(loc="upper left", fontsize=8)

    if has_memory:
        memory_axis = axes[0][1]
        for group, joined, suffix in ((gpt2, True, "GPT-2"), (others, False, "other models")):
            _memory_series(memory_axis, group, "export_memory", f"torch.export alone ({suffix})", colors["export"], joined)
            _memory_series(memory_axis, group, "plan_memory", f"planner.plan ({suffix})", colors["plan"], joined)
        memory_axis.set_xlabel("layers (transformer blocks)")
        memory_axis.set_ylabel("peak RSS growth (MB), one call in a fresh process")
        memory_axis.set_title("peak memory growth")
        memory_axis.set_ylim(bottom=0)
        memory_axis.set_xlim(0, 1.12 * max(row["layers"] for row in rows))
        memory_axis.grid(True, alpha=0.3)
        memory_axis.legend(loc="upper left", fontsize=8)

    figure.suptitle("Planning on the meta device (no weights), batch 1")
    figure.tight_layout()
    figure.savefig(output, dpi=150)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=Path, default=RESULTS / "runtime.json", metavar="PATH",
                        help="results of runtime.py (default: benchmarks/results/runtime.json)")
    parser.add_argument("--planning", type=Path, default=RESULTS / "planning.json", metavar="PATH",
                        help="results of planning.py (default: benchmarks/results/planning.json)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent.parent / "docs" / "img", metavar="DIR",
                        help="folder for speedup.png and planning.png (default: docs/img)")
    args = parser.parse_args()

    figures = (("speedup.png", args.runtime, RUNTIME_KEYS, plot_speedup),
               ("planning.png", args.planning, PLANNING_KEYS, plot_planning))
    written = 0
    for filename, source, required, plot in figures:
        if not source.is_file():
            print(f"skipped {filename}: {source} not found", file=sys.stderr)
            continue
        try:
            rows = load_rows(source, required)
        except ValueError as exc:
            parser.error(str(exc))
        args.out_dir.mkdir(parents=True, exist_ok=True)
        plot(rows, args.out_dir / filename)
        print(f"wrote {args.out_dir / filename} from {source}")
        written += 1
    if not written:
        parser.exit(1, "no figure written: none of the results files exists\n")


if __name__ == "__main__":
    main()
