"""Microbenchmark: Re-attention providers against the eager official baseline, on the device present.

The README's main command (``make bench``) is ``python -m benchmarks.bench_reattn --quick``;
without ``--quick`` the full suite runs. Providers (see benchmarks/providers.py): ``eager`` (the
official DeepViT core, the baseline), every fused reattn backend available on the device,
``torch.compile`` of the eager core, ``vit-pytorch`` (norm "layer") and ``sdpa`` (no mixing, the
floor), all on the same q, k, v and weights.

For every shape x mode (fwd, bwd, fwd+bwd) x norm (batch-train, batch-eval, layer) x dtype it
records the median time with p20/p80, TFLOP/s by ``common.flops_model``'s cost model, GB/s against the
bytes the op must move, the speed-up over eager, the peak memory the call allocates, the compile
time of torch.compile (its first call, kept out of the timing) and the largest difference of the
output from eager's. A provider that refuses a configuration (ValueError) is recorded as skipped
with its reason; any other error as failed with its message.

Output: a table on the terminal, rows appended to <--results>/microbench.csv (with device,
versions, git commit and date), PNG plots next to it, and (unless --no-models) the whole-model
benchmark of benchmarks/bench_models.py. ``make bench`` writes them outside the checkout (under the
virtual environment); ``--results benchmarks/results`` (``make bench-record``) records them in the
repository, and ``python -m benchmarks.report`` then rewrites the README's results section from there.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

from benchmarks import common
from benchmarks.providers import BASELINE, COMPILED, NORM_MODES, SDPA, Provider, build_providers, make_eager_core

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# name: (heads H, tokens N, head dim D), after the models they come from.
NAMED_SHAPES: Dict[str, tuple] = {
    "DeiT-S": (6, 197, 64),
    "DeepViT-16b": (12, 197, 32),
    "DeepViT-L-384": (12, 577, 35),
    "ViT-B": (12, 197, 64),
}
SWEEP_SHAPE = "sweep-H16-D64"
SWEEP_HEADS, SWEEP_HEAD_DIM = 16, 64


@dataclass(frozen=True)
class Config:
    """One measured configuration; every provider runs it on the same inputs and weights."""

    shape: str
    heads: int
    tokens: int
    head_dim: int
    batch: int
    mode: str
    norm: str
    dtype: str


@dataclass(frozen=True)
class Suite:
    """What a run measures: the named shapes, the N sweep, and how long each measurement runs."""

    name: str
    shapes: Sequence[str]
    modes: Sequence[str]
    norms: Sequence[str]
    dtypes: Sequence[str]
    batch: int
    sweep_tokens: Sequence[int]
    sweep_modes: Sequence[str]
    sweep_norms: Sequence[str]
    sweep_tokens_per_batch: int
    warmup: int
    reps: int
    compile_scope: str  # torch.compile on "all" configurations, the "named" shapes only, or "none"
    # Batch at N=197 of particular named shapes, over `batch` (the GPU targets of issues 3 and 6 put
    # DeepViT-16b at B=128 and DeiT-S at B=256); --batch replaces it for every shape.
    batch_by_shape: Mapping[str, int] = field(default_factory=dict)

    def compiles(self, config: Config) -> bool:
        return self.compile_scope == "all" or (self.compile_scope == "named" and config.shape != SWEEP_SHAPE)

    def configs(self) -> List[Config]:
        configs = []
        for dtype in self.dtypes:
            for shape in self.shapes:
                heads, tokens, head_dim = NAMED_SHAPES[shape]
                # Longer sequences: fewer images, about the same number of tokens.
                batch = max(1, self.batch_by_shape.get(shape, self.batch) * 197 // tokens)
                for norm in self.norms:
                    for mode in self.modes:
                        configs.append(Config(shape, heads, tokens, head_dim, batch, mode, norm, dtype))
            for norm in self.sweep_norms:
                for mode in self.sweep_modes:
                    for tokens in self.sweep_tokens:
                        batch = max(1, self.sweep_tokens_per_batch // tokens)
                        configs.append(Config(SWEEP_SHAPE, SWEEP_HEADS, tokens, SWEEP_HEAD_DIM, batch, mode, norm,
                                              dtype))
        return configs


def default_suite(device: torch.device, quick: bool) -> Suite:
    """The quick suite (``make bench``) and the full suite (``make bench-full``) for a device type.

    Batch sizes: on a GPU, enough work per call to fill it (DeiT-S at B=256 writes a 119 MB map
    in bf16; the sweep keeps B·N at 16k tokens); on a CPU, small enough for seconds per call.
    torch.compile: a cold inductor compile of one configuration takes 5-40 s on a 2-core CPU, so
    the quick suite compiles only on GPUs, and there only the named shapes (``--compile all``
    adds it anywhere).
    """
    gpu = device.type == "cuda"
    if quick:
        return Suite(
            name="quick",
            shapes=("DeiT-S", "DeepViT-16b"),
            modes=("fwd", "fwd+bwd"),
            norms=NORM_MODES if gpu else ("batch-train", "batch-eval"),
            dtypes=("bfloat16",) if gpu else ("float32",),
            batch=256 if gpu else 8,
            sweep_tokens=(256, 512, 1024, 2048, 4096) if gpu else (256, 512, 1024),
            sweep_modes=("fwd", "fwd+bwd") if gpu else ("fwd",),
            sweep_norms=("batch-eval",),
            sweep_tokens_per_batch=16384 if gpu else 1,
            warmup=2 if gpu else 1,
            reps=20 if gpu else 5,
            compile_scope="named" if gpu else "none",
            batch_by_shape={"DeepViT-16b": 128} if gpu else {},
        )
    return Suite(
        name="full",
        shapes=tuple(NAMED_SHAPES),
        modes=MODES,
        norms=NORM_MODES,
        dtypes=("bfloat16", "float16", "float32") if gpu else ("float32", "bfloat16"),
        batch=256 if gpu else 32,
        sweep_tokens=(128, 256, 512, 1024, 2048, 4096) if gpu else (128, 256, 512, 1024, 2048),
        sweep_modes=MODES,
        sweep_norms=("batch-eval", "batch-train"),
        sweep_tokens_per_batch=16384 if gpu else 1,
        warmup=5 if gpu else 2,
        reps=100 if gpu else 20,
        compile_scope="all",
        batch_by_shape={"DeepViT-16b": 128} if gpu else {},
    )


# ----------------------------------------------------------------------------- one configuration


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_inputs(config: Config, device: torch.device):
    generator = torch.Generator().manual_seed(1)
    dtype = DTYPES[config.dtype]
    needs_grad = config.mode != "fwd"

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype).requires_grad_(needs_grad)

    shape = (config.batch, config.heads, config.tokens, config.head_dim)
    q, k, v = rand(*shape), rand(*shape), rand(*shape)
    grad_out = torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
    return q, k, v, grad_out


class _Calls:
    """The timed call of one provider in one mode, and what must happen untimed around it."""

    def __init__(self, provider: Provider, mode: str, q, k, v, grad_out) -> None:
        self.provider, self.mode = provider, mode
        self.q, self.k, self.v, self.grad_out = q, k, v, grad_out
        self.leaves = (q, k, v) + tuple(provider.parameters)
        self._pending: Optional[torch.Tensor] = None

    def forward(self) -> torch.Tensor:
        with torch.set_grad_enabled(self.mode != "fwd"):
            return self.provider.fn(self.q, self.k, self.v)

    def prepare_backward(self) -> None:
        """bwd mode: the forward whose backward the next call times (untimed)."""
        self._pending = self.forward()

    def timed(self) -> Optional[torch.Tensor]:
        if self.mode == "fwd":
            return self.forward()
        if self.mode == "fwd+bwd":
            self.forward().backward(self.grad_out)
            return None
        pending, self._pending = self._pending, None
        pending.backward(self.grad_out)
        return None

    def before_each(self) -> Optional[Callable[[], None]]:
        return self.prepare_backward if self.mode == "bwd" else None

    def clear_grads(self) -> None:
        for tensor in self.leaves:
            tensor.grad = None


def run_config(config: Config, suite: Suite, device: torch.device, meta: Dict[str, str],
               excluded: Sequence[str] = ()) -> List[Dict[str, object]]:
    """Measure every provider on one configuration; one row per provider (skipped ones included)."""
    dtype = DTYPES[config.dtype]
    q, k, v, grad_out = _make_inputs(config, device)
    core = make_eager_core(config.heads, config.head_dim, config.norm, device, dtype)
    providers = build_providers(core, config.norm, device, dtype, with_compile=suite.compiles(config),
                                excluded=excluded)
    element_size = torch.empty((), dtype=dtype).element_size()
    flops = common.flops_model(config.batch, config.heads, config.tokens, config.tokens, config.head_dim, config.mode,
                               config.norm)
    io_bytes = common.bytes_model(config.batch, config.heads, config.tokens, config.tokens, config.head_dim,
                                  config.mode, element_size)
    rows: Dict[str, Dict[str, object]] = {}
    reference: Optional[torch.Tensor] = None
    ready: List[tuple] = []  # (provider, calls, first_call_s, output, peak bytes)

    def refused(provider: Provider, error: Exception) -> None:
        row = rows[provider.name]
        if isinstance(error, ValueError):
            row.update(status="skipped", note=str(error))
        else:
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            row.update(status="failed", note=f"{type(error).__name__}: {message}"[:300])

    for provider in providers:
        rows[provider.name] = dict(meta, suite=suite.name, **asdict(config), provider=provider.name)
        if provider.skip_reason is not None:
            rows[provider.name].update(status="skipped", note=provider.skip_reason)
            continue
        calls = _Calls(provider, config.mode, q, k, v, grad_out)
        try:
            # First call: compiles torch.compile (timed apart), and gives the output to compare.
            start = time.perf_counter()
            output = calls.forward()
            if config.mode != "fwd":
                output.backward(grad_out)
            _synchronize(device)
            first_call_s = time.perf_counter() - start
            output = output.detach()
            calls.clear_grads()
            if config.mode == "bwd":
                calls.prepare_backward()
            peak = common.peak_memory_bytes(calls.timed, device)
            calls.clear_grads()
        except Exception as error:  # noqa: BLE001 - a provider's refusal or failure is a result, not a crash
            refused(provider, error)
            continue
        if provider.name == BASELINE:
            reference = output
        ready.append((provider, calls, first_call_s, output, peak))

    timed = [common.TimedCall(calls.timed, calls.before_each(), calls.leaves) for _, calls, *_ in ready]
    if device.type == "cuda":  # pragma: no cover - needs a GPU; a GPU is not shared, each provider in turn
        timings: List[object] = []
        for call in timed:
            try:
                timings.append(common.time_calls(call.fn, device, suite.warmup, suite.reps,
                                                 before_each=call.before_each, grad_to_none=call.grad_to_none))
            except Exception as error:  # noqa: BLE001
                timings.append(error)
    else:
        timings = common.time_interleaved(timed, suite.warmup, suite.reps)

    baseline_ms: Optional[float] = None
    for (provider, calls, first_call_s, output, peak), timing in zip(ready, timings):
        calls.clear_grads()
        if isinstance(timing, Exception):
            refused(provider, timing)
            continue
        if provider.name == BASELINE:
            baseline_ms = timing.median_ms
        difference = ""
        if reference is not None and provider.name not in (BASELINE, SDPA):
            difference = f"{(output.float() - reference.float()).abs().max().item():.3g}"
        seconds = timing.median_ms / 1e3
        rows[provider.name].update(
            status="ok",
            median_ms=round(timing.median_ms, 4), p20_ms=round(timing.p20_ms, 4), p80_ms=round(timing.p80_ms, 4),
            tflops_model=round(flops / seconds / 1e12, 4), gbps_io=round(io_bytes / seconds / 1e9, 3),
            speedup_vs_eager=round(baseline_ms / timing.median_ms, 3) if baseline_ms else "",
            peak_mem_mb=round(peak / 2**20, 2),
            compile_s=round(first_call_s, 2) if provider.compiled else "",
            max_abs_diff_vs_eager=difference, note="",
        )
    columns = ("status", "median_ms", "p20_ms", "p80_ms", "tflops_model", "gbps_io", "speedup_vs_eager", "peak_mem_mb",
               "compile_s", "max_abs_diff_vs_eager", "note")
    # Every row has every column, in one order (skipped rows with blanks).
    return [dict(row, **{column: row.get(column, "") for column in columns}) for row in rows.values()]


# ----------------------------------------------------------------------------- table


def print_table(rows: List[Dict[str, object]]) -> None:
    """The rows as a readable table, one block per configuration."""
    if not rows:
        return
    first = rows[0]
    print(f"\ndevice: {first['device']} | torch {first['torch']} | triton {first['triton'] or '-'} "
          f"| CUDA {first['cuda'] or '-'} | commit {first['commit']} | {first['date']} "
          f"| load average {first['load_avg_1m']} at start")
    print("TFLOP/s: the fused algorithm's FLOPs (common.flops_model) / time, the same count for every provider; "
          "GB/s: q, k, v, O (and dO, dq, dk, dv) bytes / time; peak MB: tensor memory the call allocates.")
    header = (f"{'provider':<15}{'median ms':>11}{'p20-p80 ms':>19}{'TFLOP/s':>9}{'GB/s':>8}{'vs eager':>10}"
              f"{'peak MB':>10}{'compile s':>11}  note")
    last_key = None
    for row in rows:
        key = (row["dtype"], row["shape"], row["tokens"], row["batch"], row["mode"], row["norm"])
        if key != last_key:
            print(f"\n{row['shape']} (B={row['batch']}, H={row['heads']}, N={row['tokens']}, D={row['head_dim']}) "
                  f"{row['dtype']} {row['mode']} norm={row['norm']}")
            print(header)
            print("-" * len(header))
            last_key = key
        if row["status"] != "ok":
            print(f"{row['provider']:<15}{row['status']:>11}  {row['note']}")
            continue
        speedup = f"{row['speedup_vs_eager']:.2f}x" if row["speedup_vs_eager"] != "" else "-"
        spread = f"{row['p20_ms']:.3f}-{row['p80_ms']:.3f}"
        compile_s = f"{row['compile_s']:.1f}" if row["compile_s"] != "" else ""
        note = f"max |O - O_eager| = {row['max_abs_diff_vs_eager']}" if row["max_abs_diff_vs_eager"] else ""
        print(f"{row['provider']:<15}{row['median_ms']:>11.3f}{spread:>19}{row['tflops_model']:>9.3f}"
              f"{row['gbps_io']:>8.2f}{speedup:>10}{row['peak_mem_mb']:>10.1f}{compile_s:>11}  {note}")


# ----------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="the quick suite (README's main command): DeiT-S and DeepViT-16b, a short N sweep")
    parser.add_argument("--shapes", nargs="+", choices=sorted(NAMED_SHAPES), help="named shapes (default: suite's)")
    parser.add_argument("--modes", nargs="+", choices=MODES)
    parser.add_argument("--norms", nargs="+", choices=NORM_MODES)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, help="batch size at N=197 (longer sequences scale it down)")
    parser.add_argument("--sweep-tokens", type=int, nargs="*", help="N of the H=16, D=64 sweep (none: no sweep)")
    parser.add_argument("--sweep-modes", nargs="+", choices=MODES)
    parser.add_argument("--sweep-norms", nargs="+", choices=NORM_MODES)
    parser.add_argument("--sweep-tokens-per-batch", type=int, help="sweep batch = max(1, this // N)")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--reps", type=int)
    parser.add_argument("--compile", dest="compile_scope", choices=("none", "named", "all"),
                        help="where torch.compile runs (default: full suite all; quick suite named shapes on "
                             "GPU, none on CPU)")
    parser.add_argument("--no-models", action="store_true", help="skip the whole-model benchmark")
    parser.add_argument("--models-only", action="store_true", help="only the whole-model benchmark")
    parser.add_argument("--results", type=Path, default=common.RESULTS_DIR,
                        help="folder of the CSVs and plots (default: benchmarks/results)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--machine", default="", help='a label of this computer for the CSV and README, '
                        'e.g. "2-core dev machine"')
    parser.add_argument("--exclude", nargs="+", default=[], metavar="PROVIDER",
                        help="providers (or model backends) to leave out; recorded as skipped")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads on CPU (default: torch's choice)")
    return parser.parse_args(argv)


def suite_from_args(args: argparse.Namespace, device: torch.device) -> Suite:
    base = default_suite(device, args.quick)
    overrides = dict(shapes=args.shapes, modes=args.modes, norms=args.norms, dtypes=args.dtypes, batch=args.batch,
                     sweep_tokens=args.sweep_tokens, sweep_modes=args.sweep_modes, sweep_norms=args.sweep_norms,
                     sweep_tokens_per_batch=args.sweep_tokens_per_batch, warmup=args.warmup, reps=args.reps,
                     compile_scope=args.compile_scope)
    given = {key: value for key, value in overrides.items() if value is not None}
    fields = asdict(base)
    fields.update(given)
    if args.batch is not None:
        fields["batch_by_shape"] = {}
    if given.keys() - {"compile_scope"}:
        fields["name"] = f"{base.name}-custom"
    return Suite(**fields)


def run_microbenchmarks(suite: Suite, device: torch.device, machine: str = "", excluded: Sequence[str] = (),
                        show_progress: bool = True) -> List[Dict[str, object]]:
    from tqdm import tqdm

    meta = common.run_metadata(device, machine)
    meta = dict(run_id=f"{meta['date']}-{meta['commit']}", **meta)
    configs = suite.configs()
    rows: List[Dict[str, object]] = []
    progress = tqdm(configs, desc="microbenchmarks", unit="config", disable=not show_progress)
    for config in progress:
        progress.set_postfix_str(f"{config.shape} N={config.tokens} {config.mode} {config.norm} {config.dtype}")
        rows.extend(run_config(config, suite, device, meta, excluded))
    return rows


def warn_if_busy(device: torch.device) -> None:
    """Say so when other processes already load the CPU: CPU timings are then slow and noisy."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if device.type == "cpu" and load > 0.5 * cores:
        print(f"warning: the 1-minute load average is {load:.2f} on {cores} cores: other processes compete for "
              f"the CPU and the timings will be slow and noisy (providers take turns so comparisons stay fair; "
              f"--threads 1 often suffers less when the cores are shared)", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    warn_if_busy(device)
    started = time.perf_counter()
    suite = suite_from_args(args, device)
    if not args.models_only:
        rows = run_microbenchmarks(suite, device, args.machine, args.exclude)
        print_table(rows)
        csv_path = args.results / "microbench.csv"
        common.append_csv(rows, csv_path)
        print(f"\nappended {len(rows)} rows to {csv_path}")
        if not args.no_plots:
            from benchmarks import plots

            for path in plots.plot_run(rows, args.results):
                print(f"wrote {path}")
    if not args.no_models:
        from benchmarks import bench_models

        bench_models.main_from_suite(device, quick=args.quick, results=args.results, machine=args.machine,
                                     excluded=args.exclude)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s; results (CSV rows, plots) in {args.results}")
    if args.results.resolve() != common.RESULTS_DIR.resolve():
        print("(the checkout's benchmarks/results and README are unchanged: `make bench-record` records a full run "
              "there)")


if __name__ == "__main__":
    main()
