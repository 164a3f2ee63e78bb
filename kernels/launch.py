"""Launch rules (tiles, warps, stages) of the fused Re-attention kernels, and the one launch point.

Nothing here imports ``reattn``; only the standard library at import time (the registry imports
the rules without triton; ``device_shared_limit`` and ``run_on_device`` import torch and triton
when called).

Tiles (``TileConfig``; kernels/common.py explains slots): a program owns ``G`` row groups of
``BLOCK_M`` query rows for all heads, as ``HP`` slots (``HP = 16`` for up to 16 heads, else 32;
``G = HP // H``), and sweeps the keys ``BLOCK_N`` at a time; the head dim is padded to
``BLOCK_D`` (a power of two >= 16) or, where a program's tiles would not fit, split into chunks of
``BLOCK_D`` columns, one program per chunk. What bounds the tiles is the register file:

* the output accumulator [HP, BLOCK_M, BLOCK_D] in fp32 takes HP * BLOCK_M * BLOCK_D /
  (32 * num_warps) registers per thread; the rule keeps it at 64 or less of the 255 a thread may
  hold (8 warps: BLOCK_M = 32 at HP * BLOCK_D = 512, 16 at 1024);
* the score-side tiles [HP, BLOCK_M, BLOCK_N] (S, P, the mixed map, LayerNorm's centred map) take
  HP * BLOCK_M * BLOCK_N / 256 registers each; BLOCK_N = 16 keeps four of them under 64 registers.

Rows per program (G * BLOCK_M) decide how often a batch element's keys and values are re-read
from L2 (Nq / rows per program times); the reads are what a larger BLOCK_M would save, the
accumulator what it would cost.

Under Triton's interpreter (``TRITON_INTERPRET=1``) the tiles are the smallest the products allow
(BLOCK_M = BLOCK_N = 16, 4 warps, 1 stage): the interpreter's cost is per element.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

MAX_HEADS = 32
MAX_HEAD_DIM = 128


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


# The static model's dry run (``kernels/capture.py``) sets CAPTURE to a recorder: while it is set,
# ``run_on_device`` records each launch instead of running it and the launch rule sees the target
# GPU's shared memory, never the interpreter. Every Triton launch goes through ``run_on_device``.
CAPTURE = None


def interpreting() -> bool:
    if CAPTURE is not None:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1"


def padded_slots(h: int) -> int:
    """HP: slots per program, a power of two >= 8 (the head mixing's tensor-core product needs K >= 8)."""
    return max(8, next_pow2(h))


def padded_head_dim(d: int) -> int:
    return max(16, next_pow2(d))


@dataclass(frozen=True)
class TileConfig:
    """Tiles and launch options of one kernel (see the module doc)."""

    HP: int
    G: int
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    STATS_BLOCK_N: int
    num_warps: int
    num_stages: int

    def meta(self, stats_sweep: bool = True) -> dict:
        """Keyword arguments for the kernel launch (constexprs and launch options).

        stats_sweep: the kernel runs the softmax statistics sweep (forward, Gram sums) and takes
        STATS_BLOCK_N; the backward's kernels do not.
        """
        meta = dict(HP=self.HP, G=self.G, BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, BLOCK_D=self.BLOCK_D,
                    num_warps=self.num_warps, num_stages=self.num_stages)
        if stats_sweep:
            meta["STATS_BLOCK_N"] = self.STATS_BLOCK_N
        return meta

    @property
    def rows(self) -> int:
        """Query rows per program."""
        return self.G * self.BLOCK_M

    def programs_per_batch(self, n_q: int) -> int:
        return -(-n_q // self.rows)

    def check_heads(self, h: int, where: str) -> None:
        if self.G * h > self.HP or self.G < 1:
            raise ValueError(f"{where}: config {self} cannot hold {h} heads (G * H must be <= HP)")


def _check_shape(h: int, d: int) -> None:
    if h < 1 or h > MAX_HEADS:
        raise ValueError(f"re_attention: H must be in 1..{MAX_HEADS}, got {h}")
    if d < 1 or d > MAX_HEAD_DIM:
        raise ValueError(f"re_attention: head dim must be in 1..{MAX_HEAD_DIM}, got {d}")


def device_shared_limit(device) -> Optional[int]:
    """Shared memory a kernel may use per block on ``device`` (bytes), or None off a CUDA GPU."""
    if CAPTURE is not None:
        return CAPTURE.shared_limit
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return int(torch.cuda.get_device_properties(index).shared_memory_per_block_optin)


def forward_config(n_q: int, n_k: int, d: int, h: int, *, interpret: Optional[bool] = None,
                   shared_limit: Optional[int] = None, element_size: int = 2) -> TileConfig:
    """Tiles of the forward and the statistics sweep for one problem shape (see the module doc).

    shared_limit: the GPU's shared memory per block in bytes (``device_shared_limit``), None off a
    GPU. element_size: bytes per input element (fp32 and fp64 run CUDA-core products on
    narrower tiles).
    """
    _check_shape(h, d)
    if interpret is None:
        interpret = interpreting()
    hp = padded_slots(h)
    g = hp // h
    block_d = padded_head_dim(d)
    if interpret:
        return TileConfig(HP=hp, G=g, BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, STATS_BLOCK_N=16, num_warps=4,
                          num_stages=1)
    if element_size > 2:  # exact fp32 / fp64 products run on the CUDA cores: narrow tiles
        block_d = min(block_d, 32)
        return TileConfig(HP=hp, G=g, BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, STATS_BLOCK_N=16, num_warps=4,
                          num_stages=1)
    # The accumulator at <= 64 registers per thread with 8 warps (the score-side tiles, the query
    # tile and the pipeline's addresses take the rest of the 255); head-dim chunks beyond that.
    while hp * 16 * block_d > 64 * 256:
        block_d //= 2
    block_m = max(16, min(64, 64 * 256 // (hp * block_d)))
    return TileConfig(HP=hp, G=g, BLOCK_M=block_m, BLOCK_N=16, BLOCK_D=block_d, STATS_BLOCK_N=32, num_warps=8,
                      num_stages=2)


def run_on_device(kernel, grid, device, *args, **kwargs) -> None:
    """Launch ``kernel`` on ``device``'s current stream: every Triton launch of reattn goes through here.

    Triton checks a compiled kernel's shared memory against the GPU before launching it; should a
    launch rule fall short of what this Triton version needs, that is a ValueError naming the
    kernel and its configuration, not Triton's bare error. Under ``kernels.capture.capture_launches``
    the launch is recorded, not run.
    """
    if CAPTURE is not None:
        CAPTURE.record(kernel, grid, args, kwargs)
        return
    from triton.runtime.errors import OutOfResources

    try:
        if getattr(device, "type", device) == "cuda":
            import torch

            with torch.cuda.device(device):
                kernel[grid](*args, **kwargs)
        else:
            kernel[grid](*args, **kwargs)
    except OutOfResources as error:
        config = {k: kwargs[k] for k in ("HP", "G", "BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages")
                  if k in kwargs}
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel
        raise ValueError(f"{name} at {config} does not fit {device}: {error}") from error


def backward_config(n_q: int, n_k: int, d: int, h: int, *, interpret: Optional[bool] = None,
                    shared_limit: Optional[int] = None, element_size: int = 2, kernel: str = "dq") -> TileConfig:
    """Tiles of the backward's two kernels (see the module doc and kernels/backward.py).

    kernel "dq": the query-major sweep, two [HP, BLOCK_M, BLOCK_D] accumulators (X and Y) where the
    forward has one, so half the forward's BLOCK_M. kernel "dkdv": the key-major sweep, with the
    dK and dV accumulators [HP, BLOCK_N, BLOCK_D] over its key block (the slots' rows are keys
    there: BLOCK_N plays the part of BLOCK_M) and the whole head dim in one program.
    """
    if kernel not in ("dq", "dkdv"):
        raise ValueError(f"backward_config: kernel must be 'dq' or 'dkdv', got {kernel!r}")
    _check_shape(h, d)
    if interpret is None:
        interpret = interpreting()
    hp = padded_slots(h)
    g = hp // h
    block_d = padded_head_dim(d)
    if interpret:
        return TileConfig(HP=hp, G=g, BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, STATS_BLOCK_N=16, num_warps=4,
                          num_stages=1)
    if element_size > 2:
        return TileConfig(HP=hp, G=g, BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d if kernel == "dkdv" else min(block_d, 32),
                          STATS_BLOCK_N=16, num_warps=4, num_stages=1)
    if kernel == "dq":  # two accumulators, X and Y [HP, BLOCK_M, BLOCK_D]
        while 2 * hp * 16 * block_d > 64 * 256:
            block_d //= 2
        block_m = max(16, min(32, 64 * 256 // (2 * hp * block_d)))
        return TileConfig(HP=hp, G=g, BLOCK_M=block_m, BLOCK_N=16, BLOCK_D=block_d, STATS_BLOCK_N=16, num_warps=8,
                          num_stages=2)
    # dK and dV [HP, BLOCK_N, BLOCK_D] over a key block of 16 per slot
    while 2 * hp * 16 * block_d > 64 * 256:
        block_d //= 2
    return TileConfig(HP=hp, G=g, BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, STATS_BLOCK_N=16, num_warps=8,
                      num_stages=1)
