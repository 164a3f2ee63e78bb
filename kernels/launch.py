"""Launch heuristics (block sizes, warps, stages) for the fused Re-attention kernels.

Nothing here imports ``reattn``; only the standard library at import time (``device_shared_limit``
and ``run_on_device`` import torch and triton when called).

Forward rule (``forward_config``), one program = one batch element x BLOCK_M query rows x all
heads (head mixing needs every head of a tile):

* ``HP = max(16, next_pow2(H))``: heads are padded to a power of two and to at least 16,
  because the head mixing runs as ``tl.dot(W [HP, HP], P [HP, BLOCK_M * BLOCK_N])`` and
  ``tl.dot`` needs every non-batch dimension >= 16. Padded heads are masked (zero weights).
* ``BLOCK_D = max(16, next_pow2(D))``: the head dim is padded and masked (D = 33 -> 64).
* ``BLOCK_M = 16``: the smallest ``tl.dot`` tile. The batched products already have HP rows
  of heads per program, so a taller query block only adds registers.
* ``BLOCK_N = 16``: a program holds several all-head tiles at once: the query tile and the
  output accumulator ``[HP, BLOCK_M, BLOCK_D]`` plus S, P, M, A ``[HP, BLOCK_M, BLOCK_N]``.
  Measured by ahead-of-time compiles for sm_90 (bf16, LayerNorm, Triton 3.9, cuobjdump): with
  HP = 16, BLOCK_D = 32 and 8 warps, BLOCK_N = 16 needs 193 registers per thread and no spills,
  BLOCK_N = 32 needs 255 registers and spills; HP = 16, BLOCK_D = 64, BLOCK_N = 16 uses 255
  registers with a 48-byte spill stack. Wider key tiles only cost registers.
* ``num_warps = 8``: 4 warps spill already at HP = 16, BLOCK_D = 32 (255 registers, 48-byte
  stack); 16 warps cap a thread at 128 registers and still spill at BLOCK_D >= 64.
* ``num_stages``: 2 when ``BLOCK_D <= 64``, else 1 (the K/V tiles are [HP, BLOCK_N, BLOCK_D]).
* Nq and Nk do not change the choice (the grid covers Nq, the key loop Nk; a short Nk is
  masked inside one 16-wide key block). Known weak spots, for tuning on a GPU: BLOCK_D = 128
  and HP = 32 spill registers (the head-dim split below is chosen for shared memory only;
  whether splitting also pays for registers is for a GPU run to measure).

Shared memory (``shared_limit``: the GPU's bytes per block, ``device_shared_limit``): both dot
operands of every product are staged in shared memory, so a program needs about
HP x BLOCK_D x 1 KiB (forward) and more in the backward: at HP = 32 and D = 128 the forward needs
280,576 B, over even an H100's 232,448. When the whole head dim does not fit, the head dim is
split into chunks of BLOCK_D columns, one program per chunk (a second grid dimension); each
chunk's program re-reads q and k a chunk at a time for the scores (the score work is repeated
per chunk) and writes its own columns of O (dQ, dK, dV in the backward). ``SHARED_BYTES``
holds what each kernel asks for per (HP, BLOCK_D, several chunks?) at a real launch, measured by
compiling the launch as the JIT would (``kernels/aot.py``, see the table); the rule keeps the chunk
the shapes had without a limit and halves it until the kernel fits, and refuses (ValueError) when
even chunks of 16 do not. tests/kernels/test_aot.py compiles the
choices for the sm_80, sm_86/sm_89 and sm_90 limits and checks them against the real compiler.

Under Triton's interpreter (``TRITON_INTERPRET=1``) there is a single configuration
(BLOCK_M = 16, BLOCK_N = 32, 4 warps, 1 stage; HP and BLOCK_D still follow the shape, since
they are not tuning knobs): the interpreter's cost is per operation, not per element.
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


@dataclass(frozen=True)
class ForwardConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    HP: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        """Keyword arguments for the kernel launch (constexprs and launch options)."""
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, BLOCK_D=self.BLOCK_D, HP=self.HP,
                    num_warps=self.num_warps, num_stages=self.num_stages)


def padded_heads(h: int) -> int:
    return max(16, next_pow2(h))


def padded_head_dim(d: int) -> int:
    return max(16, next_pow2(d))


# Shared memory (bytes) per program at the launch rule's configurations: {kernel: {(HP, BLOCK_D, several
# head-dim chunks): bytes}}: what a real launch asks for, measured by compiling the launch the kernel's
# entry point makes as Triton's JIT compiles it (``kernels/aot.py``: unit strides become constants,
# multiples of 16 get divisibility hints, which changes the shared memory), Triton 3.9, sm_90, bf16, the
# heaviest variant (bool mask, dropout, LayerNorm; the forward's moments variant measures the same),
# D a multiple of 16 (the hints' worst case: DeiT-S's D = 64 asks 115,200 B where D = 35 asks 74,240),
# and never below what the same configuration needed compiled without integer hints (other layouts).
# At 32 (padded) heads the head-dim split does not help: each chunk's program asks 294-362 KB, over
# every GPU's limit (the compiler keeps every chunk's tiles), so the rule refuses such shapes rather
# than launch a kernel that cannot run. tests/kernels/test_resources.py checks every configuration
# the rule picks against the compiler.
SHARED_BYTES = {
    "forward": {
        (16, 16, False): 41472, (16, 32, False): 66048, (16, 64, False): 115200, (16, 128, False): 139776,
        (32, 16, False): 83968, (32, 32, False): 133120, (32, 64, False): 231424, (32, 128, False): 280576,
        (16, 16, True): 16896, (16, 32, True): 33280, (16, 64, True): 66048,
        (32, 16, True): 313344, (32, 32, True): 329728, (32, 64, True): 362496,
    },
    "bn_stats": {
        (16, 16, False): 32768, (16, 32, False): 49152, (16, 64, False): 81920, (16, 128, False): 131072,
        (32, 16, False): 65536, (32, 32, False): 98304, (32, 64, False): 163840, (32, 128, False): 262144,
        (16, 16, True): 16384, (16, 32, True): 32768, (16, 64, True): 65536,
        (32, 16, True): 294912, (32, 32, True): 294912, (32, 64, True): 294912,
    },
    "backward": {  # head dims over 64 always run in chunks of 32 (backward_config), never of 64
        (16, 16, False): 33792, (16, 32, False): 58368, (16, 64, False): 132096,
        (32, 16, False): 69632, (32, 32, False): 110592, (32, 64, False): 266240,
        (16, 16, True): 50176, (16, 32, True): 99328,
        (32, 16, True): 69632, (32, 32, True): 135168,
    },
}


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


# SHARED_BYTES is measured with bf16/fp16 operands; fp32 and fp64 operands (exact products) take
# more: 115,712 B against 41,472 B for the fp32 forward at 16 heads, D = 32 (2.8x). An upper bound
# per element size, checked for fp32 by tests/kernels/test_aot.py:
ELEMENT_SIZE_FACTOR = {1: 1, 2: 1, 4: 3, 8: 6}


def shared_bytes(kernel: str, hp: int, block_d: int, chunked: bool, element_size: int = 2) -> int:
    """What the launch rule assumes ``kernel`` needs at this configuration for inputs of ``element_size``."""
    return SHARED_BYTES[kernel][(hp, block_d, chunked)] * ELEMENT_SIZE_FACTOR[element_size]


def fit_head_dim_chunk(kernel: str, hp: int, d: int, block_d: int, shared_limit: Optional[int],
                       element_size: int = 2) -> int:
    """The widest head-dim chunk <= ``block_d`` whose program fits ``shared_limit`` (None: ``block_d``).

    Raises ValueError when not even 16 columns fit (a GPU with less shared memory than the
    kernels were measured for).
    """
    if shared_limit is None:
        return block_d
    chunk = block_d
    while True:
        needed = shared_bytes(kernel, hp, chunk, chunk < padded_head_dim(d), element_size)
        if needed <= shared_limit:
            return chunk
        if chunk == 16:
            raise ValueError(f"the Triton {kernel} kernel needs {needed} bytes of shared memory per block for "
                             f"{hp} (padded) heads even in head-dim chunks of 16; this GPU allows {shared_limit}")
        chunk //= 2


def forward_config(n_q: int, n_k: int, d: int, h: int, *, interpret: Optional[bool] = None,
                   shared_limit: Optional[int] = None, kernel: str = "forward",
                   element_size: int = 2) -> ForwardConfig:
    """Block sizes and launch options of the fused forward for one problem shape (see module doc).

    shared_limit: the GPU's shared memory per block in bytes (``device_shared_limit``); the head
    dim is split into chunks (``BLOCK_D`` < D) when a program would not fit. None: no split.
    kernel: "forward" or "bn_stats" (the statistics sweep uses the forward's tiles).
    element_size: bytes per input element (fp32 and fp64 tiles need more shared memory).
    """
    if h < 1 or h > MAX_HEADS:
        raise ValueError(f"re_attention_forward: H must be in 1..{MAX_HEADS}, got {h}")
    if d < 1 or d > MAX_HEAD_DIM:
        raise ValueError(f"re_attention_forward: head dim must be in 1..{MAX_HEAD_DIM}, got {d}")
    if interpret is None:
        interpret = interpreting()
    hp = padded_heads(h)
    block_d = padded_head_dim(d)
    if interpret:
        return ForwardConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_D=block_d, HP=hp, num_warps=4, num_stages=1)
    block_d = fit_head_dim_chunk(kernel, hp, d, block_d, shared_limit, element_size)
    num_stages = 2 if block_d <= 64 else 1
    return ForwardConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, HP=hp, num_warps=8, num_stages=num_stages)


# Head dims up to BACKWARD_SINGLE_CHUNK_D run the backward in one program per query block; larger
# ones are split into chunks of BACKWARD_CHUNK_D columns, one program per chunk (``backward_config``).
BACKWARD_SINGLE_CHUNK_D = 64
BACKWARD_CHUNK_D = 32
BACKWARD_MAX_HEAD_DIM = MAX_HEAD_DIM


def backward_config(n_q: int, n_k: int, d: int, h: int, *, interpret: Optional[bool] = None,
                    shared_limit: Optional[int] = None, element_size: int = 2) -> ForwardConfig:
    """Block sizes of the fused backward: the forward's tiles, 4 warps, no software pipelining.

    The backward holds more tiles at once (q, dO, dQ and the K, V^T, K tiles of a key block), and
    Triton's layout conversions of the [HP, BLOCK_M, BLOCK_D] tiles take shared memory. Measured
    by ahead-of-time compilation for sm_80 (bf16, HP=16, BLOCK_N=16, Triton 3.9):

    * BLOCK_D=64, one chunk: 173056 bytes with 8 or 16 warps (over sm_80's 166912), 164864 with 4.
    * BLOCK_D=128, one chunk: 336896 bytes (8 warps), over sm_80 and sm_90 alike.
    * D=128 in 2 chunks of 64: 197632 bytes (fits sm_90's 232448, not sm_80); in 4 chunks of 32:
      99328 bytes. So head dims above 64 use chunks of BACKWARD_CHUNK_D = 32: each program owns 32
      columns of dQ, dK, dV and recomputes the scores over the whole head dim (4x the score work
      at D = 128; a GPU-specific choice of 64 on sm_90 is left for tuning on a GPU).
    """
    if d > BACKWARD_MAX_HEAD_DIM:
        raise ValueError(f"re_attention_backward: head dims up to {BACKWARD_MAX_HEAD_DIM} are supported, got {d}")
    if interpret is None:
        interpret = interpreting()
    cfg = forward_config(n_q, n_k, d, h, interpret=interpret)
    block_d = cfg.BLOCK_D if cfg.BLOCK_D <= BACKWARD_SINGLE_CHUNK_D else BACKWARD_CHUNK_D
    if not interpret:
        block_d = fit_head_dim_chunk("backward", cfg.HP, d, block_d, shared_limit, element_size)
    return ForwardConfig(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=block_d, HP=cfg.HP, num_warps=4,
                         num_stages=1)


def run_on_device(kernel, grid, device, *args, **kwargs) -> None:
    """Launch ``kernel`` on ``device``'s current stream (every Triton launch of reattn goes through here).

    Triton checks a compiled kernel's shared memory against the GPU before launching it; should a
    launch rule's measured table (``SHARED_BYTES``) fall short of what this Triton version needs,
    that is a ValueError naming the kernel and its configuration, not Triton's bare error.
    Under ``kernels.capture.capture_launches`` the launch is recorded, not run.
    """
    if CAPTURE is not None:
        CAPTURE.record(kernel, grid, args, kwargs)
        return
    import torch
    from triton.runtime.errors import OutOfResources

    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                kernel[grid](*args, **kwargs)
        else:
            kernel[grid](*args, **kwargs)
    except OutOfResources as error:
        config = {k: kwargs[k] for k in ("HP", "BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages")
                  if k in kwargs}
        raise ValueError(f"{kernel.fn.__name__ if hasattr(kernel, 'fn') else kernel} at {config} does not fit "
                         f"{device}: {error} (backend='cuda' sizes its tiles to the GPU)") from error
