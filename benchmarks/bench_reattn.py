"""Microbenchmark: Re-attention providers against the eager official baseline, on the device present.

Providers, all on the same q, k, v and the same mixing / norm parameters:
  eager        reattn.re_attention(backend="eager"): the official DeepViT core
               (matmul -> softmax -> 1x1 Conv2d over heads -> BatchNorm2d -> matmul)
  <fused>      every fused reattn backend available on the device ("triton", "cuda", "cpu")
  vit-pytorch  vit-pytorch's DeepViT core (einsum mixing, LayerNorm across heads)
  sdpa         F.scaled_dot_product_attention on q, k, v: no head mixing, the floor

Prints a table and appends rows (with device, versions, git commit and date) to
benchmarks/results/microbench.csv. ``--quick`` is the README's main command.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import reattn

RESULTS = Path(__file__).resolve().parent / "results"

# name: (H, N, D), after the models the shapes come from.
SHAPES = {
    "DeiT-S": (6, 197, 64),
    "DeepViT-16b": (12, 197, 32),
    "DeepViT-L-384": (12, 577, 35),
    "ViT-B": (12, 197, 64),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_problem(B, H, N, D, dtype, device, requires_grad):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)

    q, k, v = (rand(B, H, N, D).requires_grad_(requires_grad) for _ in range(3))
    params = dict(mix_weight=rand(H, H, scale=0.3) + torch.eye(H, device=device, dtype=dtype),
                  mix_bias=rand(H, scale=0.01), norm_weight=rand(H, scale=0.1, shift=1.0), norm_bias=rand(H, scale=0.1))
    for p in params.values():
        p.requires_grad_(requires_grad)
    return q, k, v, params


def providers(device: torch.device, training: bool) -> Dict[str, Callable]:
    def reattn_backend(backend):
        def run(q, k, v, p):
            H = q.shape[1]
            # Fresh running statistics each call: training updates them in place.
            rm, rv = torch.zeros(H, device=q.device, dtype=q.dtype), torch.ones(H, device=q.device, dtype=q.dtype)
            return reattn.re_attention(q, k, v, p["mix_weight"], p["mix_bias"], norm="batch",
                                       norm_weight=p["norm_weight"], norm_bias=p["norm_bias"], running_mean=rm,
                                       running_var=rv, training=training, backend=backend)
        return run

    def vit_pytorch_core(q, k, v, p):
        attn = torch.einsum("bhid,bhjd->bhij", q, k).mul(q.shape[-1] ** -0.5).softmax(dim=-1)
        attn = torch.einsum("bhij,hg->bgij", attn, p["mix_weight"].t())
        attn = F.layer_norm(attn.permute(0, 2, 3, 1), (q.shape[1],), p["norm_weight"], p["norm_bias"]).permute(0, 3, 1, 2)
        return torch.einsum("bhij,bhjd->bhid", attn, v)

    def sdpa(q, k, v, p):
        return F.scaled_dot_product_attention(q, k, v)

    result = {"eager": reattn_backend("eager")}
    for backend in reattn.available_backends(device):
        if backend != "eager":
            result[backend] = reattn_backend(backend)
    result["vit-pytorch"] = vit_pytorch_core
    result["sdpa"] = sdpa
    return result


def measure(fn: Callable[[], None], device: torch.device, warmup: int, reps: int) -> List[float]:
    """Milliseconds per call: CUDA events on GPU, a monotonic clock on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def quantile(values: List[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def run(args) -> List[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    batch = args.batch or (128 if device.type == "cuda" else 8)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=git_commit(),
                device=device_name(device), torch=torch.__version__, cuda=torch.version.cuda or "",
                triton=_triton_version(), dtype=args.dtype, batch=batch)
    rows = []
    for shape_name in args.shapes:
        H, N, D = SHAPES[shape_name]
        for mode in args.modes:
            backward = mode == "fwd+bwd"
            q, k, v, params = make_problem(batch, H, N, D, dtype, device, requires_grad=backward)
            grad = torch.randn(batch, H, N, D, device=device, dtype=dtype)
            eager_median = None
            for name, fn in providers(device, training=True).items():
                def call(fn=fn):
                    out = fn(q, k, v, params)
                    if backward:
                        out.backward(grad)
                with torch.set_grad_enabled(backward):
                    times = measure(call, device, args.warmup, args.reps)
                median = statistics.median(times)
                eager_median = median if name == "eager" else eager_median
                rows.append(dict(meta, provider=name, shape=shape_name, H=H, N=N, D=D, mode=mode,
                                 median_ms=round(median, 4), p20_ms=round(quantile(times, 0.2), 4),
                                 p80_ms=round(quantile(times, 0.8), 4),
                                 speedup_vs_eager=round(eager_median / median, 3)))
                if backward:
                    for t in (q, k, v, *params.values()):
                        t.grad = None
    return rows


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return ""


def print_table(rows: List[dict]) -> None:
    if not rows:
        return
    first = rows[0]
    print(f"device: {first['device']} | torch {first['torch']} | dtype {first['dtype']} | batch {first['batch']} "
          f"| commit {first['commit']} | {first['date']}")
    header = f"{'shape':<14}{'mode':<9}{'provider':<13}{'median ms':>11}{'p20':>10}{'p80':>10}{'vs eager':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['shape']:<14}{r['mode']:<9}{r['provider']:<13}{r['median_ms']:>11.3f}{r['p20_ms']:>10.3f}"
              f"{r['p80_ms']:>10.3f}{r['speedup_vs_eager']:>9.2f}x")


def write_csv(rows: List[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on GPU, 8 on CPU")
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES))
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--quick", action="store_true", help="DeiT-S and DeepViT-16b, few repetitions")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--csv", type=Path, default=RESULTS / "microbench.csv")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.shapes = args.shapes or (["DeiT-S", "DeepViT-16b"] if args.quick else list(SHAPES))
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.reps = args.reps if args.reps is not None else (5 if args.quick else 20)
    rows = run(args)
    print_table(rows)
    write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
