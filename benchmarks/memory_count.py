"""Peak memory of the CUDA backend's forward+backward, counted on the CPU, against FlashAttention-2's.

No GPU needed: with ``REATTN_CUDA_EMULATE=1`` the CUDA backend runs ``csrc/cuda/ops.cpp`` on CPU tensors,
making the same torch allocations it makes on a GPU (outputs, statistics, the row pass's delta and
partial sums, the aligned copies of unaligned rows, training BatchNorm's kept X V) while the emulator
runs the programs outside torch's allocator. ``benchmarks.common.peak_memory_bytes`` (the profiler's
memory events) counts them: the peak, over one call of ``re_attention`` and its backward, of the bytes
allocated on top of the inputs and the output gradient, with the output and the input gradients kept.

The reference is what ``F.scaled_dot_product_attention``'s flash backend allocates for the same call on a
GPU (FlashAttention-2's forward and backward as torch's aten copy calls them): the output and its
logsumexp [B, H, N] fp32; then dq, dk, dv, softmax_d [B, H, N rounded up to 128] fp32 and the fp32
accumulator of dq [B, N rounded up to 128, H, D rounded up to 32]. A count, not a measurement; whatever
SDPA adds around the kernels (e.g. for head dims that are not a multiple of 8) is left out, which can only
make the reference smaller and the ratio larger.

Every allocation grows linearly with B, so B = 1 gives the ratio at any batch size. Usage::

    python -m benchmarks.memory_count [--shapes DeiT-S ViT-B] [--norms none batch-train] [--record]

--record appends the rows to ``benchmarks/results/memory_count.csv``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from benchmarks.bench_reattn import NAMED_SHAPES
from benchmarks.common import append_csv, peak_memory_bytes, run_metadata

NORMS = ("none", "batch-eval", "batch-train", "layer")
RESULTS = Path(__file__).resolve().parent / "results" / "memory_count.csv"


def flash_attention_bytes(B: int, H: int, N: int, D: int, element_size: int) -> int:
    """Bytes FlashAttention-2's forward+backward allocates (see the module doc), beyond q, k, v and dO."""
    n_rounded = -(-N // 128) * 128
    d_rounded = -(-D // 32) * 32
    tensors = 4 * B * H * N * D * element_size            # out, dq, dk, dv
    statistics = B * H * N * 4 + B * H * n_rounded * 4     # logsumexp, softmax_d
    return tensors + statistics + B * n_rounded * H * d_rounded * 4  # dq_accum


def cuda_backend_bytes(B: int, H: int, N: int, D: int, norm: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak bytes of one CUDA-backend forward+backward (the emulator's allocations, which are the GPU's)."""
    import reattn

    if os.environ.get("REATTN_CUDA_EMULATE") != "1":
        raise RuntimeError("memory_count needs REATTN_CUDA_EMULATE=1 (the CUDA backend on CPU tensors)")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
    weight = (torch.eye(H) + 0.1 * torch.randn(H, H, generator=g)).requires_grad_()
    norms = dict(none=dict(norm="none"), layer=dict(norm="layer", norm_weight=torch.ones(H), norm_bias=torch.zeros(H)))
    for mode, training in (("batch-eval", False), ("batch-train", True)):
        norms[mode] = dict(norm="batch", norm_weight=torch.ones(H), norm_bias=torch.zeros(H),
                           running_mean=torch.zeros(H), running_var=torch.ones(H), training=training)
    grad = torch.ones(B, H, N, D, dtype=dtype)

    def call():
        out = reattn.re_attention(q, k, v, weight, backend="cuda", **norms[norm])
        out.backward(grad)
        return out, q.grad, k.grad, v.grad

    return peak_memory_bytes(call, torch.device("cpu"))


def count(shapes: Sequence[str], norms: Sequence[str]) -> List[Dict[str, object]]:
    rows = []
    for name in shapes:
        H, N, D = NAMED_SHAPES[name]
        reference = flash_attention_bytes(1, H, N, D, 2)
        for norm in norms:
            ours = cuda_backend_bytes(1, H, N, D, norm)
            rows.append(dict(shape=name, B=1, H=H, N=N, D=D, dtype="bfloat16", norm=norm, backend="cuda",
                             peak_bytes=ours, flash_attention_2_bytes=reference,
                             ratio=f"{ours / reference:.3f}"))
    return rows


def main(argv: Sequence[str] = ()) -> List[Dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(NAMED_SHAPES), choices=list(NAMED_SHAPES))
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS)
    parser.add_argument("--record", action="store_true", help=f"append the rows to {RESULTS}")
    args = parser.parse_args(list(argv))
    os.environ.setdefault("REATTN_CUDA_EMULATE", "1")
    rows = count(args.shapes, args.norms)
    print("| shape | norm | cuda fwd+bwd peak (B) | FlashAttention-2 (B) | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['norm']} | {r['peak_bytes']:,} | {r['flash_attention_2_bytes']:,} | {r['ratio']} |")
    if args.record:
        meta = run_metadata(torch.device("cpu"), machine="CPU-side allocation count (CUDA backend emulated)")
        append_csv([dict(meta, **r) for r in rows], RESULTS)
        print(f"appended {len(rows)} rows to {RESULTS}")
    return rows


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
