"""The static model: predicted GPU times of every reattn GPU kernel, compiled and counted without a GPU.

    python -m benchmarks.static_model                 # table of predictions (H100 SXM, every named shape)
    python -m benchmarks.static_model --record        # also append rows to benchmarks/results/static_model.csv
                                                      # and rewrite the README section from the CSV
    python -m benchmarks.static_model --shapes DeiT-S --backends triton reference --norms layer
    python -m benchmarks.static_model --kernels       # one row per kernel of each call
    python -m benchmarks.static_model --loops         # each kernel's SASS loops: trips, instructions per iteration
    python -m benchmarks.static_model --constants     # the hardware constants and their sources

Every figure it prints is a prediction (labelled so in the CSV and README), never a measurement.

What it does, per named shape (DeiT-S B=256 H=6 N=197 D=64, DeepViT-16b B=128 H=12 N=197 D=32,
ViT-B B=128 H=12 N=197 D=64, DeepViT-L-384 B=32 H=12 N=577 D=35), bf16, norm mode (none,
batch-eval, batch-train, layer) and part (fwd, bwd, fwd+bwd):

* triton: the Triton backend's Python path for one call runs on ``device="meta"`` tensors with
  every Triton launch recorded (``kernels.capture``) and every torch operation between them
  counted (``benchmarks.eager_model.OpCounter``); each launch is compiled for sm_90 (and sm_80)
  exactly as Triton's JIT would (``kernels.aot.compile_launch``: the JIT's own argument
  specialization); its SASS is read (``benchmarks.sass``): registers, spills, shared memory,
  instructions by class; the SASS loops are matched to the source's runtime loops, whose trip
  counts come from the launch's arguments (``benchmarks.source_loops``);
* cuda: the programs of ``csrc/cuda`` as ``reattn/_C*.so`` holds them, chosen by the extension's own
  planners as ``csrc/cuda/ops.cpp`` chooses them on the GPU (the tensor-core forward, the backward's row
  and key passes, the CUDA-core programs where no tile shape serves), each counted by emulating its
  sm_90/sm_80 SASS for one thread block (``benchmarks.cuda_side``);
* reference: a FlashAttention-2 forward and backward in Triton (``benchmarks.reference_fa``), the
  stand-in for SDPA: attention without head mixing, the floor Re-attention is measured against;
* eager: the eager official core (``reattn.reference``) by the bytes and FLOPs of its kernels.

Then ``benchmarks.cost_model`` turns counts into a lower bound (perfect overlap of the SM's units,
L2 and HBM) and an upper bound (no overlap) per launch; a call's bounds are the sums over its
launches (they run one after another). ``useful_flops`` are the matrix products of the math once
(no recomputation, no padding): forward 4·B·H·N²·D (+ 2·B·H²·N² head mixing for Re-attention),
backward 8·B·H·N²·D (+ 4·B·H²·N²).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns without it

import torch  # noqa: E402

from benchmarks import common, cost_model  # noqa: E402

CSV_PATH = common.RESULTS_DIR / "static_model.csv"
README = common.REPO_ROOT / "README.md"
START, END = "<!-- static-model:start -->", "<!-- static-model:end -->"
SECTION_TITLE = "## Predicted on H100/H200 (static model, not measured)"

# name: (batch, heads, tokens, head dim): the microbenchmark's shapes at the batch sizes of its GPU suite.
SHAPES: Dict[str, Tuple[int, int, int, int]] = OrderedDict([
    ("DeiT-S", (256, 6, 197, 64)),
    ("DeepViT-16b", (128, 12, 197, 32)),
    ("ViT-B", (128, 12, 197, 64)),
    ("DeepViT-L-384", (32, 12, 577, 35)),
])
NORMS = ("none", "batch-eval", "batch-train", "layer")
MODES = ("fwd", "bwd", "fwd+bwd")
BACKENDS = ("triton", "cuda", "reference", "eager")
ARCHS = (90, 80)
DTYPE = torch.bfloat16

COLUMNS = ("date", "commit", "toolchain", "arch", "gpu", "backend", "kernel", "mode", "norm", "shape", "dtype",
           "registers", "spill_bytes", "shared_bytes", "blocks_per_sm", "warp_instructions", "tensor_flops",
           "useful_flops", "t_low_us", "t_high_us", "launches", "programs", "bound", "hbm_bytes", "l2_bytes",
           "tensor", "mufu", "fp32", "convert", "shared", "global", "generic", "local", "barrier", "shuffle",
           "integer", "control", "other", "status", "note")
CLASS_COLUMNS = ("tensor", "mufu", "fp32", "convert", "shared", "global", "generic", "local", "barrier", "shuffle",
                 "integer", "control", "other")


def useful_flops(backend: str, B: int, H: int, N: int, D: int, mode: str) -> float:
    attention = {"fwd": 4.0, "bwd": 8.0}
    mixing = {"fwd": 2.0, "bwd": 4.0}
    parts = ("fwd", "bwd") if mode == "fwd+bwd" else (mode,)
    total = 0.0
    for part in parts:
        total += attention[part] * B * H * N * N * D
        if backend != "reference":
            total += mixing[part] * B * H * H * N * N
    return total


# ---- calls ----------------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One kernel of a call (a compiled launch) or one torch operation (eager or the fused paths' glue)."""

    phase: str
    model: object = None         # kernel_model.KernelModel
    op: object = None            # eager_model.Op
    error: str = ""


_CALLS: Dict[tuple, List[Step]] = {}


def call_steps(backend: str, shape: str, norm: str, arch: int) -> List[Step]:
    """Every kernel and torch op of one fwd and bwd call of ``backend`` (memoized per process)."""
    key = (backend, shape, norm, arch)
    if key in _CALLS:
        return _CALLS[key]
    B, H, N, D = SHAPES[shape]
    steps: List[Step] = []
    if backend == "eager":
        from benchmarks.eager_model import eager_call

        for phase, ops in eager_call(B, H, N, D, norm, DTYPE).items():
            steps += [Step(phase, op=op) for op in ops]
    elif backend in ("triton", "reference"):
        from benchmarks import triton_side

        if backend == "triton":
            from reattn.backends.triton import TRITON_OPS

            events = triton_side.fused_call(TRITON_OPS, B, H, N, D, norm, arch, DTYPE)
        else:
            from benchmarks import reference_fa

            events = reference_fa.call(B, H, N, D, arch, DTYPE)
        for phase, items in events.items():
            for item in items:
                if hasattr(item, "kernel"):
                    steps.append(Step(phase, model=triton_side.model_launch(item, arch, backend, phase)))
                else:
                    steps.append(Step(phase, op=item))
    elif backend == "cuda":
        from benchmarks import cuda_side

        for phase, items in cuda_side.cuda_call(B, H, N, D, norm, arch, DTYPE).items():
            for item in items:
                if isinstance(item, cuda_side.Launch):
                    steps.append(Step(phase, model=cuda_side.model_launch(item, arch)))
                else:
                    steps.append(Step(phase, op=item))
    else:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _CALLS[key] = steps
    return steps


def _times(step: Step, gpu: cost_model.GPU) -> Tuple[float, float]:
    if step.model is not None:
        t = step.model.times(gpu)
        return t.t_low_us, t.t_high_us
    return step.op.times(gpu)


def rows_for(backend: str, shape: str, norm: str, arch: int, gpu: cost_model.GPU, meta: Dict[str, str],
             per_kernel: bool = True) -> List[Dict[str, object]]:
    """CSV rows (kernel rows and a ``total`` row per mode) of one backend at one shape and norm on ``gpu``."""
    B, H, N, D = SHAPES[shape]
    base = dict(meta, arch=f"sm_{arch}", gpu=gpu.name, backend=backend, norm=norm, shape=shape, dtype="bf16")
    try:
        steps = call_steps(backend, shape, norm, arch)
    except Exception as error:  # a backend that cannot be modelled says why in its rows
        return [dict(base, kernel="total", mode=mode, status="error", note=f"{type(error).__name__}: {error}"[:500])
                for mode in MODES]
    rows = []
    # fwd: the call without gradients where it differs from the one with them (eval-mode BatchNorm's inference
    # op: "infer"); fwd+bwd: the call with gradients and its backward.
    inference = any(s.phase == "infer" for s in steps)
    for mode in MODES:
        phases = {"fwd": ("infer",) if inference else ("fwd",), "bwd": ("bwd",), "fwd+bwd": ("fwd", "bwd")}[mode]
        chosen = [s for s in steps if s.phase in phases]
        total = dict(base, kernel="total", mode=mode, status="predicted", launches=len(chosen),
                     useful_flops=f"{useful_flops(backend, B, H, N, D, mode):.4g}")
        t_low = t_high = warp = tflops = hbm = l2 = 0.0
        classes = {c: 0.0 for c in CLASS_COLUMNS}
        kernels: Dict[str, dict] = OrderedDict()
        for step in chosen:
            lo, hi = _times(step, gpu)
            t_low += lo
            t_high += hi
            if step.model is not None:
                m = step.model
                timing = m.times(gpu)
                warp += m.warp_instructions
                tflops += m.tensor_flops
                hbm += m.hbm_bytes
                l2 += m.l2_bytes
                for c in CLASS_COLUMNS:
                    classes[c] += m.work.instructions.get(c, 0.0) * m.programs
                row = kernels.setdefault(m.name, dict(
                    base, kernel=m.name, mode=mode, status="predicted", registers=m.registers,
                    spill_bytes=m.spill_bytes, shared_bytes=m.shared_bytes, blocks_per_sm=timing.blocks_per_sm,
                    launches=0, programs=0, warp_instructions=0.0, tensor_flops=0.0, t_low_us=0.0, t_high_us=0.0,
                    hbm_bytes=0.0, l2_bytes=0.0, bound=timing.bound, **{c: 0.0 for c in CLASS_COLUMNS}))
                row["launches"] += 1
                row["programs"] += m.programs
                row["warp_instructions"] += m.warp_instructions
                row["tensor_flops"] += m.tensor_flops
                row["t_low_us"] += lo
                row["t_high_us"] += hi
                row["hbm_bytes"] += m.hbm_bytes
                row["l2_bytes"] += m.l2_bytes
                for c in CLASS_COLUMNS:
                    row[c] += m.work.instructions.get(c, 0.0) * m.programs
                if m.note:
                    row["note"] = m.note
            else:
                op = step.op
                hbm += op.bytes
                name = "torch ops" if backend != "eager" else f"aten.{op.name}"
                row = kernels.setdefault(name, dict(base, kernel=name, mode=mode, status="predicted", launches=0,
                                                    t_low_us=0.0, t_high_us=0.0, hbm_bytes=0.0, tensor_flops=0.0))
                row["launches"] += 1
                row["t_low_us"] += lo
                row["t_high_us"] += hi
                row["hbm_bytes"] += op.bytes
                if op.tensor:
                    row["tensor_flops"] += op.flops
                    tflops += op.flops
        total.update(t_low_us=t_low, t_high_us=t_high, warp_instructions=warp, tensor_flops=tflops, hbm_bytes=hbm,
                     l2_bytes=l2, **classes)
        rows.append(total)
        if per_kernel:
            rows += list(kernels.values())
    return [_formatted(r) for r in rows]


def _formatted(row: Dict[str, object]) -> Dict[str, object]:
    out = {}
    for k, v in row.items():
        if isinstance(v, float):
            out[k] = f"{v:.4g}" if k not in ("t_low_us", "t_high_us") else f"{v:.1f}"
        else:
            out[k] = v
    return out


def toolchain() -> str:
    import subprocess

    from benchmarks import sass

    parts = [f"triton {common.triton_version()}", f"torch {torch.__version__.split('+')[0]}"]
    try:
        out = subprocess.run([sass.tool("nvdisasm"), "--version"], capture_output=True, text=True).stdout
        release = [line for line in out.splitlines() if "release" in line]
        if release:
            parts.append("nvdisasm " + release[0].split("release")[1].split(",")[0].strip())
    except (OSError, FileNotFoundError):
        pass
    try:
        from benchmarks import cuda_side

        parts.append(cuda_side.extension_toolchain())
    except Exception:  # noqa: BLE001 - no extension: the cuda rows say so
        pass
    return ", ".join(p for p in parts if p)


def run(shapes: Sequence[str], backends: Sequence[str], norms: Sequence[str], archs: Sequence[int],
        gpus: Optional[Sequence[str]] = None, per_kernel: bool = True, progress=None) -> List[Dict[str, object]]:
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=common.git_commit(),
                toolchain=toolchain())
    rows = []
    for arch in archs:
        targets = [g for g in cost_model.GPUS_FOR_ARCH[arch] if gpus is None or g.name in gpus]
        for shape in shapes:
            for backend in backends:
                for norm in (norms if backend != "reference" else ("none",)):
                    if progress:
                        progress(f"sm_{arch} {shape} {backend} {norm}")
                    for gpu in targets:
                        rows += rows_for(backend, shape, norm, arch, gpu, meta, per_kernel)
    return rows


# ---- printing -------------------------------------------------------------------------------------------------
def _ratio_text(x: float) -> str:
    """Two significant digits, without exponents: 0.032, 2.5, 31, 120."""
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def totals_table(rows: Sequence[Dict[str, object]], gpu: str, arch: str = "sm_90") -> List[str]:
    """Markdown: per shape x mode x norm, each backend's t_low-t_high (us) and the ratios to reference and eager."""
    totals = {(r["backend"], r["shape"], r["mode"], r["norm"]): r for r in rows
              if r["kernel"] == "total" and r["gpu"] == gpu and r["arch"] == arch}
    shapes = list(dict.fromkeys(r["shape"] for r in rows if r["gpu"] == gpu))
    backends = [b for b in ("triton", "cuda") if any(k[0] == b for k in totals)]
    lines = [f"| shape | mode | norm | " + " | ".join(f"{b} (us)" for b in backends)
             + " | reference FA (us) | eager (us) | " + " | ".join(f"{b} / reference" for b in backends)
             + " | " + " | ".join(f"eager / {b}" for b in backends) + " |",
             "|---|---|---|" + "---|" * (3 * len(backends) + 2)]

    def span(r):
        if r is None:
            return "n/a"
        if r.get("status") != "predicted":
            return r.get("status", "n/a")
        return f"{_f(r['t_low_us']):.0f}–{_f(r['t_high_us']):.0f}"

    def ratio(a, b):
        if a is None or b is None or a.get("status") != "predicted" or b.get("status") != "predicted":
            return "n/a"
        lo = _f(a["t_low_us"]) / _f(b["t_low_us"])
        hi = _f(a["t_high_us"]) / _f(b["t_high_us"])
        return f"{_ratio_text(min(lo, hi))}–{_ratio_text(max(lo, hi))}"

    for shape in shapes:
        for mode in ("fwd", "fwd+bwd"):
            for norm in NORMS:
                ref = totals.get(("reference", shape, mode, "none"))
                eager = totals.get(("eager", shape, mode, norm))
                mine = [totals.get((b, shape, mode, norm)) for b in backends]
                if not any(mine) and eager is None:
                    continue
                lines.append(f"| {shape} | {mode} | {norm} | " + " | ".join(span(m) for m in mine)
                             + f" | {span(ref)} | {span(eager)} | " + " | ".join(ratio(m, ref) for m in mine)
                             + " | " + " | ".join(ratio(eager, m) for m in mine) + " |")
    return lines


def kernel_lines(rows: Sequence[Dict[str, object]], gpu: str) -> List[str]:
    lines = ["| shape | backend | mode | norm | kernel | launches | regs | spill B | shared B | blocks/SM | bound | "
             "t_low–t_high (us) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kernel"] == "total" or r["gpu"] != gpu or r["mode"] == "fwd+bwd":
            continue
        lines.append(f"| {r['shape']} | {r['backend']} | {r['mode']} | {r['norm']} | {r['kernel']} | "
                     f"{r.get('launches', '')} | {r.get('registers', '')} | {r.get('spill_bytes', '')} | "
                     f"{r.get('shared_bytes', '')} | {r.get('blocks_per_sm', '')} | {r.get('bound', '')} | "
                     f"{_f(r['t_low_us']):.1f}–{_f(r['t_high_us']):.1f} |")
    return lines


def loop_lines(shapes, backends, norms, archs) -> List[str]:
    """Each modelled kernel's loops (from the calls already modelled in this process)."""
    lines = []
    for (backend, shape, norm, arch), steps in _CALLS.items():
        if shape not in shapes or backend not in backends or norm not in norms or arch not in archs:
            continue
        seen = set()
        for step in steps:
            m = step.model
            if m is None or (m.name, step.phase) in seen:
                continue
            seen.add((m.name, step.phase))
            lines.append(f"\n{backend} {shape} {norm} sm_{arch} {step.phase} {m.name}: {m.registers} registers, "
                         f"{m.spill_bytes} B spilled, {m.shared_bytes} B shared, {m.threads} threads, "
                         f"{m.programs} programs" + (f" ({m.note})" if m.note else ""))
            for loop in m.loops:
                body = ", ".join(f"{k} {v}" for k, v in sorted(loop.per_iteration.items(), key=lambda kv: -kv[1]))
                lines.append(f"  {'  ' * loop.depth}loop [{loop.head:#x}, {loop.tail:#x}] {loop.source or '?'}: "
                             f"{loop.trips:g} trips per entry" + (f"; per iteration: {body}" if body else ""))
    return lines


def readme_section(rows: Sequence[Dict[str, str]]) -> List[str]:
    """The README section from the latest sm_90 run of each backend and shape in the CSV (what --record
    wrote: a run of some backends or shapes, ``--backends cuda --shapes ViT-B``, replaces only theirs;
    a later sm_80-only run, ``--archs 80``, adds A100 rows to the CSV without replacing the H100/H200
    tables)."""
    rows = [r for r in rows if r["arch"] == "sm_90"]
    if not rows:
        return [SECTION_TITLE, "", "No static-model run is recorded (`python -m benchmarks.static_model --record`).", ""]
    last = {}
    for r in rows:
        key = (r["backend"], r["shape"])
        last[key] = max(last.get(key, ""), r["date"])
    latest = [r for r in rows if r["date"] == last[(r["backend"], r["shape"])]]
    runs = {}
    for r in latest:
        runs.setdefault((r["date"][:10], r["commit"], r["toolchain"]), []).append(r["backend"])
    run_text = "; ".join(f"{', '.join(dict.fromkeys(b))}: run {d}, commit `{c}`, {t}"
                         for (d, c, t), b in runs.items())
    lines = [SECTION_TITLE, "",
             f"**Predicted, not measured**: no GPU has run these kernels. `python -m benchmarks.static_model` "
             f"compiles every launch of a call as Triton's JIT (or `setup.py`, for CUDA) would for sm_90, reads "
             f"the SASS, counts instructions per loop iteration times trip counts, and applies an explicit cost "
             f"model (`benchmarks/cost_model.py`, every constant with its source). Each cell is the lower bound "
             f"(every unit overlapped) – upper bound (nothing overlapped), in microseconds per call, bf16. "
             f"{run_text}.", ""]
    for gpu in ("H100-SXM", "H200"):
        if any(r["gpu"] == gpu for r in latest):
            lines += [f"**{gpu}** (sm_90). Reference FA = a FlashAttention-2 forward/backward in Triton "
                      f"(`benchmarks/reference_fa.py`), attention without head mixing: the floor. "
                      f"`x / reference` > 1 is slower than the floor; `eager / x` > 1 is faster than eager.", ""]
            lines += totals_table(latest, gpu)
            lines.append("")
    kernels = [r for r in latest if r["kernel"] != "total" and r["gpu"] == "H100-SXM" and r["backend"] != "eager"
               and r["shape"] == "DeiT-S" and r["norm"] in ("none", "layer")]
    if kernels:
        lines += ["Per kernel at DeiT-S (H100 SXM, norm none and layer): resources of the compiled code and the "
                  "resource that bounds it (`tensor`, `issue`, `mufu`, `fp32`, `shared`, `l2`, `hbm`...).", ""]
        lines += kernel_lines(kernels, "H100-SXM")
        lines.append("")
    lines += ["Hardware constants (H100 SXM, H200; A100 for the sm_80 rows of the CSV):", "",
              cost_model.constants_table(), "",
              "Sources: " + "; ".join(cost_model.SOURCES) + ".", ""]
    return lines


def write_readme(rows: Sequence[Dict[str, str]], readme: Path = README) -> None:
    text = readme.read_text()
    body = "\n".join([START] + readme_section(rows) + [END])
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + body + tail
    else:
        marker = "## Building"
        index = text.find(marker)
        text = (text[:index] + body + "\n\n" + text[index:]) if index >= 0 else text + "\n" + body + "\n"
    readme.write_text(text)


# ---- command line ----------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.static_model",
        description="Predicted (never measured) GPU times of reattn's Triton and CUDA kernels, a reference "
                    "FlashAttention-2 and eager PyTorch: compiled for sm_90/sm_80 without a GPU, SASS counted, "
                    "an explicit cost model (benchmarks/cost_model.py). Prints a table; --record appends to "
                    f"{CSV_PATH.relative_to(common.REPO_ROOT)} and rewrites the README section.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS))
    parser.add_argument("--archs", nargs="+", type=int, choices=ARCHS, default=list(ARCHS),
                        help="SASS targets: 90 (predicted on H100 SXM and H200), 80 (A100 SXM)")
    parser.add_argument("--gpu", nargs="+", choices=list(cost_model.GPUS), help="only these GPUs' rows")
    parser.add_argument("--kernels", action="store_true", help="print one row per kernel too")
    parser.add_argument("--loops", action="store_true",
                        help="print each kernel's SASS loops: source line, trips, instructions per iteration by class")
    parser.add_argument("--record", action="store_true",
                        help=f"append the rows to {CSV_PATH.relative_to(common.REPO_ROOT)} and rewrite the README "
                             "section (otherwise nothing in the checkout changes)")
    parser.add_argument("--csv", type=Path, default=CSV_PATH, help="CSV --record appends to")
    parser.add_argument("--readme", type=Path, default=README, help="README whose section --record rewrites")
    parser.add_argument("--readme-only", action="store_true", help="rewrite the README section from the CSV only")
    parser.add_argument("--constants", action="store_true", help="print the hardware constants and sources, exit")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.constants:
        print(cost_model.constants_table())
        print()
        print("\n".join(f"- {s}" for s in cost_model.SOURCES))
        return
    if args.readme_only:
        write_readme(common.read_csv(args.csv) if args.csv.exists() else [], args.readme)
        print(f"rewrote the README section from {args.csv}")
        return
    rows = run(args.shapes, args.backends, args.norms, args.archs, args.gpu,
               progress=lambda s: print(f"[static model] {s}", file=sys.stderr, flush=True))
    for gpu in dict.fromkeys(r["gpu"] for r in rows):
        arch = next(r["arch"] for r in rows if r["gpu"] == gpu)
        print(f"\nPredicted (static model, not measured) on {gpu} ({arch}), bf16, us per call, t_low–t_high:\n")
        print("\n".join(totals_table(rows, gpu, arch)))
        if args.kernels:
            print()
            print("\n".join(kernel_lines(rows, gpu)))
    if args.loops:
        print("\n".join(loop_lines(args.shapes, args.backends, args.norms, args.archs)))
    errors = [r for r in rows if r.get("status") == "error"]
    for r in errors:
        print(f"not modelled: {r['backend']} {r['shape']} {r['norm']} {r['mode']} ({r['arch']}): {r['note']}",
              file=sys.stderr)
    if args.record:
        common.append_csv(rows, args.csv)
        write_readme(common.read_csv(args.csv), args.readme)
        print(f"\nappended {len(rows)} rows to {args.csv} and rewrote the README section")


if __name__ == "__main__":
    main()
