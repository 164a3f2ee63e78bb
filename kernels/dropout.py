"""The dropout pattern of the fused kernels, materialized: for tests and for replaying a run eagerly.

The kernels never store Z; they regenerate it from (seed, b, h, i, j) with Philox in every sweep
(``common._dropout_keep``). This launches the same helper over the whole [B, H, Nq, Nk] grid so
``reattn.re_attention_ref(..., dropout_mask=dropout_keep_mask(...))`` reproduces a fused run.
Nothing here imports ``reattn``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _dropout_keep
from .launch import padded_slots

_BLOCK = 16


@triton.jit
def _dropout_keep_kernel(SEED, KEEP, H, N_Q, N_K, NUM_M_BLOCKS, NUM_N_BLOCKS, dropout_p,
                         HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // (NUM_M_BLOCKS * NUM_N_BLOCKS)).to(tl.int64)
    rest = pid % (NUM_M_BLOCKS * NUM_N_BLOCKS)
    offs_h = tl.arange(0, HP)
    offs_m = (rest // NUM_N_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (rest % NUM_N_BLOCKS) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(SEED), b, H, offs_h[:, None, None], offs_m[None, :, None],
                         (rest % NUM_N_BLOCKS) * BLOCK_N, dropout_p, HP, BLOCK_M, BLOCK_N)
    h3 = offs_h.to(tl.int64)[:, None, None]
    ptrs = KEEP + ((b * H + h3) * N_Q + offs_m.to(tl.int64)[None, :, None]) * N_K + offs_n[None, None, :]
    ok = (offs_h < H)[:, None, None] & (offs_m < N_Q)[None, :, None] & (offs_n < N_K)[None, None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=ok)


def dropout_keep_mask(seed: torch.Tensor, shape, dropout_p: float) -> torch.Tensor:
    """Bool [B, H, Nq, Nk], True where the fused kernels keep P for this ``seed`` ([1] int64) and p."""
    B, H, Nq, Nk = shape
    keep = torch.empty((B, H, Nq, Nk), dtype=torch.uint8, device=seed.device)
    if keep.numel() == 0:
        return keep.bool()
    num_m, num_n = triton.cdiv(Nq, _BLOCK), triton.cdiv(Nk, _BLOCK)
    grid = (B * num_m * num_n,)
    args = (seed, keep, H, Nq, Nk, num_m, num_n, float(dropout_p))
    meta = dict(HP=padded_slots(H), BLOCK_M=_BLOCK, BLOCK_N=_BLOCK)
    if seed.device.type == "cuda":
        with torch.cuda.device(seed.device):
            _dropout_keep_kernel[grid](*args, **meta)
    else:
        _dropout_keep_kernel[grid](*args, **meta)
    return keep.bool()
