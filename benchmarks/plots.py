"""PNG plots of one microbenchmark run: time and memory against N per provider, speed-up bars per shape.

Files (in the results folder, named by device type and dtype so a CPU and a GPU run sit side by side):
  {device}-{dtype}-time-vs-n.png     median time (p20-p80 band) of the H=16, D=64 sweep, log-log
  {device}-{dtype}-memory-vs-n.png   peak memory the call allocates, same sweep, log-log
  {device}-{dtype}-speedup.png       speed-up over eager per named shape, one panel per mode and norm

``python -m benchmarks.plots`` redraws them from the CSV (the latest run per device type).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from benchmarks.providers import BASELINE, NORM_MODES  # noqa: E402

MODE_ORDER = ("fwd", "bwd", "fwd+bwd")

SWEEP_PREFIX = "sweep"
# One color and marker per provider, stable across plots.
STYLES = {
    "eager": ("#d62728", "o"),
    "torch.compile": ("#ff7f0e", "s"),
    "vit-pytorch": ("#8c564b", "v"),
    "sdpa": ("#7f7f7f", "x"),
    "triton": ("#1f77b4", "D"),
    "cuda": ("#2ca02c", "^"),
    "cpu": ("#9467bd", "P"),
}


def _style(provider: str):
    return STYLES.get(provider, ("#17becf", "*"))


def _number(row: Dict[str, object], key: str) -> float:
    return float(row[key])


def _ok(rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    return [row for row in rows if row.get("status") == "ok"]


def _title_suffix(rows: Sequence[Dict[str, object]]) -> str:
    first = rows[0]
    load = f", load average {first['load_avg_1m']}" if first.get("load_avg_1m") not in (None, "") else ""
    return f"{first['device']}, {first['dtype']}, {str(first['date'])[:10]}{load}"


def _panel_order(key: tuple) -> tuple:
    mode, norm = key
    return (MODE_ORDER.index(mode) if mode in MODE_ORDER else 99, NORM_MODES.index(norm) if norm in NORM_MODES else 99)


def _sweep_panels(rows: Sequence[Dict[str, object]]) -> Dict[tuple, List[Dict[str, object]]]:
    panels: Dict[tuple, List[Dict[str, object]]] = defaultdict(list)
    for row in rows:
        if str(row["shape"]).startswith(SWEEP_PREFIX):
            panels[(row["mode"], row["norm"])].append(row)
    return dict(sorted(panels.items(), key=lambda item: _panel_order(item[0])))


def _grid(count: int, width: float, height: float):
    columns = min(3, count)
    lines = -(-count // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(max(7.0, width * columns), height * lines + 0.6),
                                squeeze=False)
    for axis in axes.flat[count:]:
        axis.set_visible(False)
    return figure, list(axes.flat[:count])


def _log_axis_labels(axis, suffix: str) -> None:
    """Plain numbers (1, 2, 5, 10, ... with ``suffix``) on a log y axis instead of 10^x."""
    axis.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}{suffix}"))
    axis.yaxis.set_minor_formatter(ticker.NullFormatter())


def plot_sweep(rows: Sequence[Dict[str, object]], path: Path, metric: str) -> Path:
    """Time (``metric="time"``) or peak memory (``"memory"``) against N, one line per provider."""
    panels = _sweep_panels(rows)
    figure, axes = _grid(len(panels), 5.2, 4.2)
    for axis, ((mode, norm), panel_rows) in zip(axes, panels.items()):
        by_provider: Dict[str, List[Dict[str, object]]] = defaultdict(list)
        for row in panel_rows:
            by_provider[str(row["provider"])].append(row)
        for provider, provider_rows in by_provider.items():
            provider_rows.sort(key=lambda row: int(row["tokens"]))
            tokens = [int(row["tokens"]) for row in provider_rows]
            color, marker = _style(provider)
            if metric == "time":
                values = [_number(row, "median_ms") for row in provider_rows]
                axis.fill_between(tokens, [_number(row, "p20_ms") for row in provider_rows],
                                  [_number(row, "p80_ms") for row in provider_rows], color=color, alpha=0.2)
            else:
                values = [max(_number(row, "peak_mem_mb"), 1e-3) for row in provider_rows]
            axis.plot(tokens, values, color=color, marker=marker, label=provider,
                      linewidth=2.2 if provider == BASELINE else 1.5)
        batches = sorted({int(row["batch"]) for row in panel_rows})
        first = panel_rows[0]
        axis.set_title(f"{mode}, norm={norm}\nH={first['heads']}, D={first['head_dim']}, "
                       f"B={'/'.join(map(str, batches))}", fontsize=10)
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({int(row["tokens"]) for row in panel_rows}))
        axis.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_locator(ticker.NullLocator())
        axis.set_yscale("log")
        _log_axis_labels(axis, "")
        axis.set_xlabel("sequence length N (tokens)")
        axis.set_ylabel("median time per call (ms), p20-p80 band" if metric == "time"
                        else "peak memory allocated by the call (MiB)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(("Time" if metric == "time" else "Peak memory") + f" vs N\n{_title_suffix(rows)}", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_speedup(rows: Sequence[Dict[str, object]], path: Path) -> Path:
    """Grouped bars: speed-up over eager for every provider, per named shape; one panel per (mode, norm)."""
    named = [row for row in rows if not str(row["shape"]).startswith(SWEEP_PREFIX)]
    panels: Dict[tuple, List[Dict[str, object]]] = defaultdict(list)
    for row in named:
        panels[(row["mode"], row["norm"])].append(row)
    panels = dict(sorted(panels.items(), key=lambda item: _panel_order(item[0])))
    figure, axes = _grid(len(panels), 5.4, 3.9)
    for axis, ((mode, norm), panel_rows) in zip(axes, panels.items()):
        shapes = list(dict.fromkeys(str(row["shape"]) for row in panel_rows))
        providers = [p for p in dict.fromkeys(str(row["provider"]) for row in panel_rows) if p != BASELINE]
        width = 0.8 / max(1, len(providers))
        for index, provider in enumerate(providers):
            values = []
            for shape in shapes:
                match = [row for row in panel_rows if row["shape"] == shape and row["provider"] == provider]
                values.append(_number(match[0], "speedup_vs_eager") if match else 0.0)
            positions = [x + (index - (len(providers) - 1) / 2) * width for x in range(len(shapes))]
            values = [value if value > 0 else float("nan") for value in values]
            bars = axis.bar(positions, values, width=width, color=_style(provider)[0], label=provider)
            axis.bar_label(bars, labels=[f"{value:.2f}" if value == value else "" for value in values], fontsize=7,
                           padding=1)
        axis.axhline(1.0, color=_style(BASELINE)[0], linestyle="--", linewidth=1, label="eager = 1")
        batches = {str(row["shape"]): row["batch"] for row in panel_rows}
        axis.set_xticks(range(len(shapes)))
        axis.set_xticklabels([f"{shape}\nB={batches[shape]}" for shape in shapes], fontsize=9)
        axis.set_yscale("log")
        _log_axis_labels(axis, "×")
        low, high = axis.get_ylim()
        axis.set_ylim(min(low, 0.8), high * 2.0)  # room for the bar labels above the tallest bar
        axis.set_ylabel("speed-up over eager (log scale)")
        axis.set_title(f"{mode}, norm={norm}", fontsize=10)
        axis.grid(True, axis="y", which="both", alpha=0.3)
    # One legend for every panel, below them, so it never hides a bar.
    handles, labels = {}, {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    figure.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=9,
                  frameon=False)
    figure.suptitle(f"Speed-up over the eager official core (median time ratio)\n{_title_suffix(named)}",
                    fontsize=11)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_run(rows: Sequence[Dict[str, object]], folder: Path) -> List[Path]:
    """Every plot of one run, per dtype; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    ok = _ok(rows)
    for dtype in dict.fromkeys(str(row["dtype"]) for row in ok):
        dtype_rows = [row for row in ok if row["dtype"] == dtype]
        prefix = folder / f"{dtype_rows[0]['device_type']}-{dtype}"
        if _sweep_panels(dtype_rows):
            written.append(plot_sweep(dtype_rows, Path(f"{prefix}-time-vs-n.png"), "time"))
            written.append(plot_sweep(dtype_rows, Path(f"{prefix}-memory-vs-n.png"), "memory"))
        if any(not str(row["shape"]).startswith(SWEEP_PREFIX) for row in dtype_rows):
            written.append(plot_speedup(dtype_rows, Path(f"{prefix}-speedup.png")))
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Redraw the plots of the latest run per device type from the CSV (``python -m benchmarks.plots``)."""
    import argparse

    from benchmarks import common

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--results", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    rows = common.read_csv(args.results / "microbench.csv")
    for device_type in ("cuda", "cpu"):
        for path in plot_run(common.latest_run(rows, device_type), args.results):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
