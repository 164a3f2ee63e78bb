"""Measured times next to the static model's predictions: the calibration step of the GPU session.

    python -m benchmarks.gpu_timing --out /tmp/reattn-gpu/measured.csv --budget 200

On a GPU, times every call the static model covers (``benchmarks.static_model``: the named shapes at
their batch sizes, bf16, each norm mode, fwd and fwd+bwd; backends triton, cuda, the reference
FlashAttention-2 and eager) with CUDA events, and the kernels inside each call with the profiler,
then writes one CSV row per (backend, kernel or ``total``, mode, norm, shape) with ``measured_us``
beside the model's ``t_low_us``/``t_high_us`` for the same GPU and arch (read from
benchmarks/results/static_model.csv; empty when the model has no row for that GPU). bwd rows are
fwd+bwd minus fwd. Cases run in order of priority (DeiT-S and DeepViT-16b first) until ``--budget``
seconds are spent, each row written as soon as it is measured, so a cut-off run still leaves data.

Timing: ``warmup`` untimed calls (Triton compiles there), then ``reps`` calls each between two CUDA
events, the median (``measured_us``: one call alone, the host's latency included), and ``reps`` calls back
to back between two events (``pipelined_us``: the host queuing ahead, as in a model). Kernel times: one more call under ``torch.profiler`` (CUDA activity), durations
summed per kernel name. A backend that cannot run a case writes a row with its reason in ``note``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from benchmarks import common

COLUMNS = ("date", "commit", "gpu", "device", "arch", "backend", "kernel", "mode", "norm", "shape", "dtype", "batch",
           "measured_us", "pipelined_us", "t_low_us", "t_high_us", "reps", "note")
# The static model's GPU names for the devices the session may get.
MODEL_GPU = {"H100": "H100-SXM", "H200": "H200", "A100": "A100-SXM"}
PRIORITY = ("DeiT-S", "DeepViT-16b", "ViT-B", "DeepViT-L-384")
# Plain attention, timed once per shape as yardsticks: the static model's reference FlashAttention-2
# (benchmarks/reference_fa.py) and torch's own scaled_dot_product_attention (FlashAttention or cuDNN).
PLAIN_ATTENTION = ("reference", "sdpa")


def model_gpu_name(device_name: str) -> str:
    for key, name in MODEL_GPU.items():
        if key in device_name:
            return name
    return device_name


def cases(shapes: Sequence[str], norms: Sequence[str], backends: Sequence[str]) -> List[Tuple[str, str, str]]:
    """(shape, backend, norm) in the order they are measured: shape by priority, then backend, then norm."""
    out = []
    for shape in sorted(shapes, key=lambda s: PRIORITY.index(s) if s in PRIORITY else len(PRIORITY)):
        for backend in backends:
            for norm in (("none",) if backend in PLAIN_ATTENTION else norms):
                out.append((shape, backend, norm))
    return out


def make_call(backend: str, norm: str, B: int, H: int, N: int, D: int, device: torch.device,
              dtype: torch.dtype) -> Callable[[bool], torch.Tensor]:
    """call(backward: bool): one forward (and backward) of ``backend`` on fresh-looking inputs of the shape."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen).to(device=device, dtype=dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(B, H, N, D, generator=gen).to(device=device, dtype=dtype)
    params: Dict[str, torch.Tensor] = {}  # the module's parameters and buffers (none for plain attention)
    if backend == "reference":
        from benchmarks.reference_fa import attention

        def forward():
            return attention(q, k, v)
    elif backend == "sdpa":
        def forward():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    else:
        import reattn
        from benchmarks.triton_side import norm_arguments

        kw = norm_arguments(norm, H)
        params = {}
        for name in ("mix_weight", "mix_bias", "norm_weight", "norm_bias"):
            if kw.get(name) is not None:
                shape = tuple(kw[name].shape)
                init = torch.eye(H) if name == "mix_weight" else torch.ones(shape) * (name == "norm_weight")
                params[name] = (init + 0.01 * torch.randn(shape, generator=gen)).to(device).requires_grad_()
        for name in ("running_mean", "running_var"):
            if kw.get(name) is not None:
                params[name] = torch.full((H,), 0.01 if name == "running_mean" else 0.02, device=device)
        options = dict(norm=kw["norm"], training=kw["training"], backend=backend)

        def forward():
            return reattn.re_attention(q, k, v, params["mix_weight"], params.get("mix_bias"),
                                       norm_weight=params.get("norm_weight"), norm_bias=params.get("norm_bias"),
                                       running_mean=params.get("running_mean"),
                                       running_var=params.get("running_var"), **options)

    leaves = [q, k, v] + [t for t in params.values() if t.requires_grad]

    def call(backward: bool) -> torch.Tensor:
        if backward:
            # Fresh gradients each call, as a training step after zero_grad(set_to_none=True): accumulating
            # into .grad would add a read-add-write of dq, dk, dv (81 us at DeiT-S) to every backend's time.
            for leaf in leaves:
                leaf.grad = None
            out = forward()
            out.backward(grad)
            return out
        with torch.no_grad():
            return forward()

    return call


def time_call(call: Callable[[], object], device: torch.device, warmup: int, reps: int) -> Tuple[float, float]:
    """(isolated, pipelined) microseconds per call.

    isolated: the median of ``reps`` calls each between two CUDA events, the GPU idle before each: it
    includes the host's time to reach the GPU's last kernel (Python, dispatch, launches), which a GPU
    faster than its host leaves exposed. pipelined: ``reps`` calls back to back between two events, over
    ``reps``: the host queues ahead while the GPU works, as in a model's forward pass, so this is the GPU's
    time when the host keeps up (perf_counter on CPU: both the same measure)."""
    for _ in range(warmup):
        call()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            call()
        end.record()
        end.synchronize()
        pipelined = start.elapsed_time(end) * 1e3 / reps
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e6)
        pipelined = sum(times) / len(times)
    return statistics.median(times), pipelined


def kernel_times(call: Callable[[], object], device: torch.device) -> Dict[str, float]:
    """Microseconds per kernel name over one call (the profiler's device events), CUDA only."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize(device)
    return aggregate_kernels((getattr(e, "key", None) or e.name, e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
                             for e in prof.key_averages())


_CXX_TYPES = {"reattn::dev::Bf16": "bfloat16", "reattn::dev::F16": "float16", "__nv_bfloat16": "bfloat16",
              "13__nv_bfloat16": "bfloat16", "__half": "float16", "6__half": "float16", "float": "float32",
              "f": "float32", "double": "float64", "d": "float64"}
# The last argument of RowConfig (csrc/cuda/row_configs.h: ForwardVariant, then kBackwardRows,
# kPlainBackwardRows and kPlainLayerBackwardRows) and of KeyConfig (backward_configs.h: kKeysGeneral,
# kKeysPlain, kKeysPlainLayer).
ROW_VARIANTS = {"0": "plain_affine", "1": "plain_layer", "2": "plain_moments", "3": "general", "4": "backward_rows",
                "5": "plain_backward_rows", "6": "plain_layer_backward_rows"}
KEY_VARIANTS = {"0": "general", "1": "plain", "2": "plain_layer"}


def kernel_name(raw: str) -> str:
    """The static model's name for a profiled kernel: Triton's function name; for the CUDA programs
    ``re_attention_kernel<dtype, kind>``, ``forward_kernel<RowConfig<dtype, shape..., variant>>`` (or
    ``forward_kernel<NarrowTail<RowConfig<...>>>``), ``statistics_kernel<StatisticsConfig<dtype, warps, tiles, d,
    narrow>>``, ``key_kernel<KeyConfig<dtype, shape..., variant>>``, ``head_affine_kernel<dtype>`` and
    ``head_dot_sums_kernel<dtype>`` (from the demangled name, or the mangled one of the CUDA-core programs and
    the element-wise steps)."""
    import re

    if "re_attention_kernel" in raw:
        kinds = {"0": "forward", "1": "gram_sums", "2": "backward", "3": "bn_grad_sums"}
        m = re.search(r"re_attention_kernel<([^,]+),\s*(\d)>", raw) or re.search(r"kernelI(\w+?)Li(\d)E", raw)
        if m:
            dtype = _CXX_TYPES.get(m.group(1), m.group(1))
            return f"re_attention_kernel<{dtype}, {kinds.get(m.group(2), m.group(2))}>"
    m = re.search(r"(head_affine_kernel|head_dot_sums_kernel)<([\w:]+)>", raw) or re.search(
        r"(head_affine_kernel|head_dot_sums_kernel)I(\w+?)EEvNS0_16HeadAffineParams", raw)
    if m:
        return f"{m.group(1)}<{_CXX_TYPES.get(m.group(2), m.group(2))}>"
    m = re.search(r"(forward_kernel|key_kernel|statistics_kernel)<(?:reattn::cuda::)?(?:(NarrowTail)<(?:reattn::cuda::)?)?"
                  r"(RowConfig|KeyConfig|StatisticsConfig)<([\w:]+),\s*([-\d,\s]+)>", raw)
    if m:
        args = [a.strip() for a in m.group(5).split(",")]
        if m.group(3) == "RowConfig":
            args[-1] = ROW_VARIANTS.get(args[-1], args[-1])
        elif len(args) == 6:  # kslabs, groups, heads, d, tiles, variant
            args[-1] = KEY_VARIANTS.get(args[-1], args[-1])
        config = f"{m.group(3)}<{_CXX_TYPES.get(m.group(4), m.group(4))}, {', '.join(args)}>"
        return f"{m.group(1)}<{m.group(2)}<{config}>>" if m.group(2) else f"{m.group(1)}<{config}>"
    return raw


def aggregate_kernels(events: Iterable[Tuple[str, float]]) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for name, us in events:
        if us and us > 0:
            key = kernel_name(name)
            out[key] = out.get(key, 0.0) + float(us)
    return out


def predictions(path: Path, gpu: str, arch: str) -> Dict[tuple, Dict[str, str]]:
    """Latest static-model rows for ``gpu``/``arch`` by (backend, kernel, mode, norm, shape)."""
    if not path.exists():
        return {}
    rows = [r for r in common.read_csv(path) if r.get("gpu") == gpu and r.get("arch") == arch]
    if not rows:
        return {}
    last = max(r["date"] for r in rows)
    return {(r["backend"], r["kernel"], r["mode"], r["norm"], r["shape"]): r for r in rows if r["date"] == last}


def run(out: Path, budget: float, shapes: Sequence[str], norms: Sequence[str], backends: Sequence[str],
        device: torch.device, warmup: int = 3, reps: int = 10, model_csv: Optional[Path] = None,
        batch: Optional[int] = None, log=print) -> List[Dict[str, object]]:
    from benchmarks.static_model import CSV_PATH, SHAPES

    start = time.monotonic()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else common.device_name(device)
    arch = ("sm_%d%d" % torch.cuda.get_device_capability(device)) if device.type == "cuda" else "cpu"
    gpu = model_gpu_name(name)
    predicted = predictions(model_csv or CSV_PATH, gpu, arch)
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=common.git_commit(), gpu=gpu,
                device=name, arch=arch, dtype="bf16")
    dtype = torch.bfloat16
    rows: List[Dict[str, object]] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        writer.writeheader()

        def emit(row):
            key = (row["backend"], row["kernel"], row["mode"], row["norm"], row["shape"])
            p = predicted.get(key, {})
            row = dict(meta, **row, t_low_us=p.get("t_low_us", ""), t_high_us=p.get("t_high_us", ""))
            writer.writerow(row)
            f.flush()
            rows.append(row)

        for shape, backend, norm in cases(shapes, norms, backends):
            if time.monotonic() - start > budget:
                log(f"budget of {budget:.0f} s spent: stopping before {shape} {backend} {norm}")
                break
            B, H, N, D = SHAPES[shape]
            B = batch or B
            base = dict(backend=backend, norm=norm, shape=shape, batch=B)
            try:
                call = make_call(backend, norm, B, H, N, D, device, dtype)
                fwd, fwd_pipelined = time_call(lambda: call(False), device, warmup, reps)
                both, both_pipelined = time_call(lambda: call(True), device, warmup, reps)
            except Exception as error:  # noqa: BLE001 - a backend that cannot run says why, the rest go on
                for mode in ("fwd", "fwd+bwd"):
                    emit(dict(base, kernel="total", mode=mode, note=f"{type(error).__name__}: {error}"[:300]))
                log(f"{shape} {backend} {norm}: {type(error).__name__}: {error}")
                continue
            for mode, us, pipelined in (("fwd", fwd, fwd_pipelined), ("fwd+bwd", both, both_pipelined),
                                        ("bwd", both - fwd, both_pipelined - fwd_pipelined)):
                emit(dict(base, kernel="total", mode=mode, measured_us=f"{us:.1f}", pipelined_us=f"{pipelined:.1f}",
                          reps=reps))
            for mode, backward in (("fwd", False), ("fwd+bwd", True)):
                for kernel, us in kernel_times(lambda: call(backward), device).items():
                    emit(dict(base, kernel=kernel, mode=mode, measured_us=f"{us:.1f}", reps=1))
            log(f"{shape} {backend} {norm}: fwd {fwd:.1f} us ({fwd_pipelined:.1f} pipelined), "
                f"fwd+bwd {both:.1f} us ({both_pipelined:.1f} pipelined)")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    from benchmarks.static_model import NORMS, SHAPES

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_timing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/reattn-gpu")) / "measured.csv")
    parser.add_argument("--budget", type=float, default=200.0, help="seconds to spend (rows are written as they come)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=list(NORMS))
    parser.add_argument("--backends", nargs="+", default=["triton", "cuda", "reference", "sdpa", "eager"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--batch", type=int, help="override every shape's batch (a smoke test)")
    parser.add_argument("--device", default="cuda", help="cuda (the session); cpu runs the pipeline for tests")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_timing: no CUDA GPU here; this step measures GPU kernels (--device cpu only tests the pipeline)",
              file=sys.stderr)
        return 2
    rows = run(args.out, args.budget, args.shapes, args.norms, args.backends, device, args.warmup, args.reps,
               batch=args.batch)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
