"""Rewrite the README's "## Results" section from the benchmark CSVs (``python -m benchmarks.report``).

For each device type (cpu, cuda) the latest run in benchmarks/results/microbench.csv and
models.csv is rendered: device, date, commit, suite and machine label, a table of the named
shapes (median time, speed-up over eager, peak memory for every provider; skipped providers with
their reasons), links to the plots of that run, and the whole-model images/s. Only what the CSVs
hold is printed: a device type without rows says that no run is recorded.

The section lies between ``<!-- results:start -->`` and ``<!-- results:end -->``; without these
markers a "## Results" section is inserted before "## Building".
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from benchmarks import common
from benchmarks.plots import SWEEP_PREFIX
from benchmarks.providers import BASELINE

START, END = "<!-- results:start -->", "<!-- results:end -->"
README = common.REPO_ROOT / "README.md"
DEVICE_TITLES = {"cuda": "GPU", "cpu": "CPU"}


PROVIDER_ORDER = ("eager", "triton", "cuda", "cpu", "torch.compile", "vit-pytorch", "sdpa")


def _number(value: float) -> str:
    """Three significant digits, never in scientific notation."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _cell(row: Dict[str, str]) -> str:
    if row["status"] != "ok":
        return row["status"]
    speedup = "" if row["provider"] == BASELINE else f" ({float(row['speedup_vs_eager']):.2f}×)"
    return f"{_number(float(row['median_ms']))} ms{speedup}, {_number(float(row['peak_mem_mb']))} MiB"


def _run_header(rows: Sequence[Dict[str, str]]) -> str:
    first = rows[0]
    label = f" — {first['machine']}" if first.get("machine") else ""
    versions = f"torch {first['torch']}" + (f", CUDA {first['cuda']}" if first["device_type"] == "cuda" else "")
    return (f"**{first['device']}**{label}; {first['date'][:10]}, commit `{first['commit']}`, suite "
            f"`{first['suite']}`, {versions}, load average {first.get('load_avg_1m') or '?'} at the start")


def microbench_section(rows: Sequence[Dict[str, str]], folder: Path, readme_dir: Path) -> List[str]:
    """Markdown lines for one run of the microbenchmark."""
    lines = [_run_header(rows), ""]
    named = [row for row in rows if not row["shape"].startswith(SWEEP_PREFIX)]
    providers = sorted(dict.fromkeys(row["provider"] for row in rows),
                       key=lambda name: PROVIDER_ORDER.index(name) if name in PROVIDER_ORDER else len(PROVIDER_ORDER))
    skipped: Dict[str, set] = defaultdict(set)
    for dtype in dict.fromkeys(row["dtype"] for row in named):
        cells: Dict[tuple, Dict[str, str]] = {}
        for row in named:
            if row["dtype"] == dtype:
                key = (row["shape"], row["batch"], row["heads"], row["tokens"], row["head_dim"], row["mode"],
                       row["norm"])
                cells.setdefault(key, {})[row["provider"]] = row
                if row["status"] != "ok":
                    skipped[f"{row['provider']} ({row['status']})"].add(row["note"])
        lines.append(f"{dtype}: median time per call (speed-up over eager), peak memory the call allocates.")
        lines.append("")
        lines.append("| shape | mode | norm | " + " | ".join(providers) + " |")
        lines.append("|---|---|---|" + "---|" * len(providers))
        for (shape, batch, heads, tokens, head_dim, mode, norm), by_provider in cells.items():
            values = [_cell(by_provider[p]) if p in by_provider else "n/a" for p in providers]
            lines.append(f"| {shape} B={batch} H={heads} N={tokens} D={head_dim} | {mode} | {norm} | "
                         + " | ".join(values) + " |")
        lines.append("")
    if skipped:
        lines.append("Not measured: " + "; ".join(f"{name}: {' / '.join(sorted(notes))}"
                                                   for name, notes in skipped.items()) + ".")
        lines.append("")
    device_type, dtypes = rows[0]["device_type"], dict.fromkeys(row["dtype"] for row in rows)
    for dtype in dtypes:
        for suffix, what in (("speedup", "speed-up per shape"), ("time-vs-n", "time vs N"),
                             ("memory-vs-n", "memory vs N")):
            path = folder / f"{device_type}-{dtype}-{suffix}.png"
            if path.exists():
                lines.append(f"![{device_type} {dtype} {what}]({path.relative_to(readme_dir).as_posix()})")
    lines.append("")
    return lines


def models_section(rows: Sequence[Dict[str, str]]) -> List[str]:
    first = rows[0]
    label = f" — {first['machine']}" if first.get("machine") else ""
    lines = [f"Whole models on **{first['device']}**{label} ({first['precision']}, batch {first['batch']}, "
             f"{first['image_size']} px, random weights): images/s (speed-up over eager); {first['date'][:10]}, "
             f"commit `{first['commit']}`, suite `{first['suite']}`, load average {first.get('load_avg_1m') or '?'} "
             "at the start.", "",
             "| model | mode | " + " | ".join(dict.fromkeys(row["backend"] for row in rows)) + " |",
             "|---|---|" + "---|" * len(dict.fromkeys(row["backend"] for row in rows))]
    backends = list(dict.fromkeys(row["backend"] for row in rows))
    table: Dict[tuple, Dict[str, Dict[str, str]]] = {}
    for row in rows:
        table.setdefault((row["model"], row["mode"]), {})[row["backend"]] = row
    notes = set()
    for (model, mode), by_backend in table.items():
        values = []
        for backend in backends:
            row = by_backend.get(backend)
            if row is None:
                values.append("n/a")
            elif row["status"] != "ok":
                values.append(row["status"])
                notes.add(f"{backend} {mode}: {row['note']}")
            else:
                shown = row["speedup_vs_eager"] and backend != "eager"
                speedup = f" ({float(row['speedup_vs_eager']):.2f}×)" if shown else ""
                values.append(f"{_number(float(row['images_per_s']))}{speedup}")
        lines.append(f"| {model} | {mode} | " + " | ".join(values) + " |")
    lines.append("")
    if notes:
        lines.extend(["Not measured: " + "; ".join(sorted(notes)) + ".", ""])
    return lines


def render(results: Path, readme_dir: Path) -> str:
    micro_path, models_path = results / "microbench.csv", results / "models.csv"
    micro = common.read_csv(micro_path) if micro_path.exists() else []
    models = common.read_csv(models_path) if models_path.exists() else []
    lines = [START, "",
             "Generated by `python -m benchmarks.report` from `benchmarks/results/*.csv`: the latest run per "
             "device type (every run stays in the CSVs, with TFLOP/s, GB/s, compile times and the largest "
             "difference from eager's output). Only measured numbers. Times are medians; memory is the peak "
             "tensor memory a call allocates on top of its inputs (CUDA: `max_memory_allocated`; CPU: torch's "
             "CPU allocator profiling). On a CPU shared with other jobs, the load average says how busy it was.",
             ""]
    for device_type in ("cuda", "cpu"):
        title = DEVICE_TITLES[device_type]
        lines.append(f"### {title}")
        lines.append("")
        micro_rows = common.latest_run(micro, device_type)
        model_rows = common.latest_run(models, device_type)
        if not micro_rows and not model_rows:
            lines.extend([f"No {title} run is recorded yet: `make bench` on a machine with a {title} adds one.", ""])
            continue
        if micro_rows:
            lines.extend(microbench_section(micro_rows, results, readme_dir))
        if model_rows:
            lines.extend(models_section(model_rows))
    lines.append(END)
    return "\n".join(lines)


def update_readme(readme: Path, section: str) -> None:
    text = readme.read_text()
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        text = before + section + after
    else:
        block = f"## Results\n\n{section}\n\n"
        marker = "## Building"
        text = text.replace(marker, block + marker, 1) if marker in text else text.rstrip() + "\n\n" + block
    readme.write_text(text)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the section, change nothing")
    args = parser.parse_args(argv)
    section = render(args.results, args.readme.resolve().parent)
    if args.print_only:
        print(section)
        return
    update_readme(args.readme, section)
    print(f"updated the results section of {args.readme}")


if __name__ == "__main__":
    main()
