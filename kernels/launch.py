"""Launch rules (tiles, warps, stages) of the fused Re-attention kernels, and the one launch point.

Nothing here imports ``reattn``; only the standard library at import time (the registry imports
the rules without triton; ``device_shared_limit`` and ``run_on_device`` import torch and triton
when called).

Tiles (``TileConfig``; kernels/common.py explains slots): a program owns ``G`` row groups of
``BLOCK_M`` query rows for all heads, as ``HP = max(8, next_pow2(H))`` slots (``G = HP // H``),
and sweeps the keys ``BLOCK_N`` at a time; the head dim (a multiple of 16: the wrappers pad it) is
covered by ``BLOCK_D`` (a power of two >= 16) or split into chunks of ``BLOCK_D`` columns, one
program per chunk. What bounds the tiles is the register file, 255 registers per thread:

* an fp32 accumulator [HP, rows, BLOCK_D] takes HP * rows * BLOCK_D / (32 * num_warps) registers
  per thread; the rules keep the accumulators at 64 or less (the forward's O; the dq kernel's X
  and Y; the dK/dV kernel's dK and dV, whose rows are keys);
* every live score-side tile [HP, BLOCK_M, BLOCK_N] (S, P, the mixed map, the norm's terms, the
  mask, dropout's keep) takes HP * BLOCK_M * BLOCK_N / 256 registers. How many are live depends
  on the *variant*: "plain" (no mask, no dropout, norm none or an affine batch norm), "layer"
  (LayerNorm across heads) or "heavy" (a mask or dropout). The rules were fitted to the compiled
  kernels (sm_90, Triton 3.9): ``python -m benchmarks.launch_scan`` compiles every configuration
  they can pick and records registers, spills and shared memory in benchmarks/results/launch_scan.csv.

Rows per program (G * BLOCK_M) decide how often a batch element's keys and values are staged
through shared memory (N / rows times): that traffic, not the tensor cores, bounds the kernels (docs/math.md, "Cost"),
so BLOCK_M is as large as the accumulator allows.

Shared memory: ``shared_bytes`` bounds what a configuration asks for (checked against every
compiled launch in tests/kernels/test_aot.py); where the GPU has less (sm_86: 101,376 B), the
rules drop the pipelining, then take 16-key blocks, then halve the head-dim chunk.

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


def head_dim_tail(d: int) -> int:
    """D_TAIL of ``forward._split_sweep``: where the head dim d (a multiple of 16) is not a power of two but the
    sum of two, the smaller (48 = 32 + 16, 80 = 64 + 16, 96 = 64 + 32), which the sweep takes as a tile of its
    own after the first padded_head_dim(d) / 2 columns; else 0 (one tile of padded_head_dim(d))."""
    whole = padded_head_dim(d)
    tail = d - whole // 2
    return tail if d % 16 == 0 and 0 < tail < whole // 2 and tail & (tail - 1) == 0 else 0


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

    def key_programs_per_batch(self, n_k: int) -> int:
        """Programs per batch element of the key-major dK/dV kernel, whose slots' rows are ``G`` groups of
        ``BLOCK_N`` keys (its query blocks are ``BLOCK_M`` rows)."""
        return -(-n_k // (self.G * self.BLOCK_N))

    def bias_slot(self, h: int, has_dropout: bool, has_bias: bool) -> bool:
        """Whether a per-slot bias rides in a padding slot (``common._slot_params``' BIAS_SLOT): one
        exists (G * h < HP), there is a bias to carry (the mixing bias, or BatchNorm's shift) and no
        dropout (the slot's P is 1 wherever kept only without it), so the tensor cores add it."""
        return self.G * h < self.HP and not has_dropout and has_bias

    def splits_heads(self, h: int, d: int, *, stats_given: bool, norm: str, masked: bool, has_dropout: bool,
                     d_chunks: int) -> bool:
        """Whether the forward runs ``forward._split_sweep``: 12 heads in 16 slots as two products of 8 and 4
        heads, without the 4 padding slots (with the moments too). Only reading given statistics, no mask,
        no dropout, and the head dim (d, as the kernels see it) in one tile; LayerNorm up to d = 64 (one stage,
        ``forward_config``; the norm's centering is in the weights, ``common._center_across_heads``). The
        sweep is written for any h = 3 HP / 4, but the launch scan (benchmarks/launch_scan.py) compiles 24 heads
        (32 slots) only as the usual kernels, so the split sweep's compiles there are unchecked for spills; at
        8 slots (6 heads) the two- and four-head products would split their keys over warp pairs, and re-read
        q from shared memory at every key block."""
        return (self.HP == 16 and h == 12 and self.G == 1 and stats_given and not masked
                and (norm != "layer" or d <= 64)
                and not has_dropout and d_chunks == 1)

    def check_heads(self, h: int, where: str) -> None:
        if self.G * h > self.HP or self.G < 1:
            raise ValueError(f"{where}: config {self} cannot hold {h} heads (G * H must be <= HP)")


def _check_shape(h: int, d: int) -> None:
    if h < 1 or h > MAX_HEADS:
        raise ValueError(f"re_attention: H must be in 1..{MAX_HEADS}, got {h}")
    if d < 1 or d > MAX_HEAD_DIM:
        raise ValueError(f"re_attention: head dim must be in 1..{MAX_HEAD_DIM}, got {d}")


# Shared memory per block (bytes) that a kernel may use on sm_<cap>, from the CUDA occupancy tables
# (for compiling ahead of time and capturing launches without a GPU).
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


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


VARIANTS = ("plain", "layer", "heavy")


def variant_of(norm: str, masked: bool, dropout: bool) -> str:
    """The launch rules' variant of a call (module doc): "heavy" with a mask or dropout, else
    "layer" for LayerNorm, else "plain"."""
    if masked or dropout:
        return "heavy"
    return "layer" if norm == "layer" else "plain"


def shared_bytes(kernel: str, config: "TileConfig", element_size: int = 2, masked: bool = True,
                 split_heads: bool = False, d_tail: int = 0) -> int:
    """An upper bound of the shared memory (bytes) Triton gives ``kernel`` at ``config``.

    d_tail: the head dim's tail of the softmax statistics kernel (``head_dim_tail``), whose q tile and K
    blocks are BLOCK_D + d_tail wide (other kernels: ignored).

    split_heads: the backward's sweeps of 12 heads in two products (``splits_backward_heads``), which stage
    two operand tiles of the 12 heads at a time, [3 HP / 4, 16, BLOCK_D] (K and V, or q and dO, transposed),
    and the scratch of the mixing's exchanges (compiled, sm_90: 49,152 B in dQ, 40,960 in dK/dV at D = 64;
    the usual kernels' bound, 143,360 and 173,056, would keep them off sm_86 and sm_80).

    The staged tiles: K and V blocks [HP, BLOCK_N, BLOCK_D] (num_stages copies when pipelined), the
    query-side tiles [HP, BLOCK_M, BLOCK_D] (Q; dq and dK/dV also dO, in two operand layouts there),
    a pipelined mask, and the scratch of the score tiles' layout conversions around the head mixing
    (one fp32 [HP, BLOCK_M, BLOCK_N]). Fitted to the compiled kernels (sm_90, Triton 3.9:
    benchmarks/results/launch_scan.csv): tight for small head-dim tiles, up to ~60% over for large
    ones, where Triton reuses the conversion scratch; tests/kernels/test_aot.py checks it bounds
    every compiled launch.
    """
    hp, bm, bn, bd = config.HP, config.BLOCK_M, config.BLOCK_N, config.BLOCK_D
    stages = max(1, config.num_stages)
    keys = hp * bn * bd * element_size           # one K (or V) block
    rows = hp * bm * bd * element_size           # one Q (or dO) block
    mask = hp * bm * bn * stages if masked else 0
    scores = hp * bm * bn * 4
    if split_heads and kernel in ("dq", "dkdv"):
        return 2 * (3 * hp // 4) * max(bm, bn) * bd * element_size + scores
    if kernel in ("forward", "gram"):
        return 2 * stages * keys + rows + mask + scores
    if kernel == "dq":
        return 2 * stages * keys + 2 * rows + mask + scores * 3 // 4
    if kernel == "softmax_stats":  # the q tile, the pipelined K blocks (one head) and an fp32 row (compiled:
        # 50,176 B at 256 rows, 64-key blocks, D = 64, two stages; 24,576 at 128 rows, D = 32 + 16)
        return (rows + stages * keys) * (bd + d_tail) // bd + 4 * bm
    if kernel == "dkdv":
        # Q and dO in two operand layouts each; the mask shares the transposed score tiles' scratch;
        # one fp32 [HP, BLOCK_N] row for the reductions over the key block (compiled: 50,176 B at 16
        # slots, 16-wide tiles, BatchNorm, against 49,152 without it)
        return 2 * keys + (stages + 2) * rows + max(mask, scores // 2) + 4 * hp * bn
    raise ValueError(f"shared_bytes: kernel must be forward, gram, softmax_stats, dq or dkdv, got {kernel!r}")


def _fit_shared(kernel: str, config: "TileConfig", shared_limit: Optional[int], element_size: int,
                variant: str) -> "TileConfig":
    """``config``, or the first of: one stage, 16-key blocks, head-dim chunks halved (down to 16),
    16-row blocks, that fits ``shared_limit``; a ValueError naming the need and the limit when none does."""
    from dataclasses import replace

    if shared_limit is None:
        return config
    candidate = config
    masked = variant == "heavy"
    while shared_bytes(kernel, candidate, element_size, masked) > shared_limit:
        if candidate.num_stages > 1:
            candidate = replace(candidate, num_stages=1)
        elif candidate.BLOCK_N > 16:  # smaller key blocks before head-dim chunks, which recompute the scores
            candidate = replace(candidate, BLOCK_N=16)
        elif candidate.BLOCK_D > 16:
            candidate = replace(candidate, BLOCK_D=candidate.BLOCK_D // 2)
        elif candidate.BLOCK_N > 16 or candidate.BLOCK_M > 16:
            candidate = replace(candidate, BLOCK_M=16, BLOCK_N=16)
        else:
            need = shared_bytes(kernel, candidate, element_size, masked)
            raise ValueError(f"the {kernel} kernel needs {need} B of shared memory at its smallest tiles "
                             f"({candidate}); this GPU allows {shared_limit}")
    return candidate


# Warps of the fp32 / fp64 launches (CUDA-core products over operand tiles twice as wide as bf16's): 8, as the
# bf16 launches, which halves each thread's share of the score tiles. Compiled with 4 warps they spilled up to
# 17,464 B per thread (sm_80, 32 heads, LayerNorm, a mask and dropout: the forward; 3,808 B with 8) and
# 10,280 / 4,248 B in the 12-head backward's dQ / dK-dV (sm_90; 1,592 / 1,624 B with 8), and ptxas took 4x
# as long over them (87 s against 21 s for that forward).
FP32_WARPS = 8


def _acc_chunk(hp: int, rows: int, block_d: int, accumulators: int) -> int:
    """The head-dim chunk that keeps ``accumulators`` fp32 [HP, rows, chunk] tiles at <= 64 registers (8 warps)."""
    while accumulators * hp * rows * block_d > 64 * 256 and block_d > 16:
        block_d //= 2
    return block_d


def forward_config(n_q: int, n_k: int, d: int, h: int, *, interpret: Optional[bool] = None,
                   shared_limit: Optional[int] = None, element_size: int = 2, variant: str = "heavy",
                   stats_given: bool = False, moments: bool = False) -> TileConfig:
    """Tiles of the forward and the statistics sweeps for one problem (see the module doc).

    d: the head dim the kernels see (a multiple of 16 on a GPU: ``forward.aligned_operands``).
    shared_limit: the GPU's shared memory per block in bytes (``device_shared_limit``), None off a
    GPU. element_size: bytes per input element (fp32 and fp64 run CUDA-core products on narrower
    tiles). variant: ``variant_of(...)``; "heavy" (the default) is safe for every call.
    stats_given: the forward reads the softmax statistics (``splits_softmax_stats``, or the Gram
    sweep wrote them) and runs only its second sweep. moments: the one-sweep BatchNorm forward
    (``with_moments``), which keeps its per-slot sums live through the sweep.
    """
    _check_shape(h, d)
    if variant not in VARIANTS:
        raise ValueError(f"forward_config: variant must be one of {VARIANTS}, got {variant!r}")
    if interpret is None:
        interpret = interpreting()
    hp = padded_slots(h)
    g = hp // h
    block_d = padded_head_dim(d)
    if interpret:
        return TileConfig(HP=hp, G=g, BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, STATS_BLOCK_N=16, num_warps=4,
                          num_stages=1)
    if element_size > 2:  # exact fp32 / fp64 products run on the CUDA cores: narrow tiles (FP32_WARPS)
        config = TileConfig(HP=hp, G=g, BLOCK_M=16, BLOCK_N=16, BLOCK_D=min(block_d, 32), STATS_BLOCK_N=16,
                            num_warps=FP32_WARPS, num_stages=1)
        return _fit_shared("forward", config, shared_limit, element_size, variant)
    whole = block_d
    block_d = _acc_chunk(hp, 16, block_d, 1)
    if variant == "heavy":
        block_m, block_n, stages = 16, 16, 1
    else:
        block_m = 32 if hp * block_d <= 512 else 16
        # A 32-key block halves the per-block work that is not per key (and the re-reads of the
        # query tile from shared memory, where the forward does not hold it in registers); its
        # score tiles fit without the LayerNorm's terms at 8 slots (at 16 slots x 16 rows the
        # compiler spilled 168 B).
        block_n = 32 if variant == "plain" and hp == 8 else 16
        # one stage for 32-key blocks and for head-dim chunks (pipelining every chunk's loads took
        # 196,608 B at 16 slots, D = 128)
        stages = 1 if block_n == 32 or block_d < whole else 2
        # Reading the statistics, the plain forward at 16 slots takes one stage: at D = 32 two spilled
        # 8 B (255 registers, sm_90), and the model predicts one as fast or faster (ViT-B 150.9-665.3 us
        # against 154.5-690.1 at two); at 32 slots with 16-wide head-dim tiles one stage spills 24 B
        # against 32. Elsewhere one stage spilled more than two (the LayerNorm forward at 16 slots and
        # D = 64: 8 B against none; the training-BatchNorm forward at 32 slots and D = 32: 24 B against
        # none; the moments at 16 slots and D = 32: 88 B against none): the compiler's schedule,
        # measured (launch scan), not derived.
        if stats_given and variant == "plain" and not moments and (hp == 16 or hp == 32 and block_d == 16):
            stages = 1
        # The split forward (12 heads, ``TileConfig.splits_heads``) takes one stage with LayerNorm and with
        # the moments too (static model, sm_90, us): LayerNorm ViT-B 122.5-620.9 -> 110.9-555.1 (two stages
        # spilled 40 B), DeepViT-L-384 166.0-827.5 -> 159.6-779.3; moments DeepViT-16b 56.7-278.3 ->
        # 53.1-261.9, ViT-B 137.1-634.6 -> 114.1-551.2 (80 -> 8 B spilled), DeepViT-L-384 168.1-810.3 ->
        # 161.7-764.6.
        if stats_given and h == 12 and hp == 16 and variant != "heavy":
            stages = 1
    config = TileConfig(HP=hp, G=g, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, STATS_BLOCK_N=32,
                        num_warps=8, num_stages=stages)
    return _fit_shared("forward", config, shared_limit, element_size, variant)


def splits_softmax_stats(variant: str, element_size: int, scale: float, h: int, d: int,
                         moments: bool = False) -> bool:
    """Whether the forward takes its softmax statistics from a launch of their own (``softmax_stats_config``).

    The forward's first sweep needs no head mixing, so it can run per head as FlashAttention's forward
    does: 2-D products over 256 query rows (on sm_90, warpgroup MMAs), each program reading its head's
    keys once, where the fused forward re-reads every key block for all its slots in both sweeps.
    The static model (H100, bf16) puts the two launches at 111.6-602.1 us against the one launch's
    113.2-665.5 at DeiT-S with norm none (mostly fewer L2 requests) and 178.9-921.3 against
    220.5-1131.9 at ViT-B with LayerNorm. For "plain" and "layer" calls (no mask: the statistics
    kernel takes none; no dropout: its launches keep their own tiles) with 16-bit inputs (the
    fp32/fp64 launches run CUDA-core products on narrow tiles, unmodelled) and scale > 0 (the max
    runs on q.k, the scale in the exponent). h, d: heads and the head dim the kernels see;
    moments: the one-sweep BatchNorm forward (``with_moments``).

    Not where the forward reading the statistics spilled more than the one-launch forward (launch
    scan, sm_90, at the stages ``forward_config`` gives it): the LayerNorm forward at 16 or 32 slots
    and D = 32 (0 -> 8 B per thread at 16 slots, 96 -> 104 B at 32), but at 12 heads, whose forward
    reading the statistics is the split sweep (``TileConfig.splits_heads``), and the moments at 32
    slots and D = 16 (456 -> 464 B).
    """
    if not (variant in ("plain", "layer") and element_size == 2 and scale > 0):
        return False
    hp, block_d = padded_slots(h), padded_head_dim(d)
    if variant == "layer" and hp >= 16 and block_d == 32 and h != 12:
        return False
    return not (moments and hp == 32 and block_d == 16)


def softmax_stats_config(d: int, n_q: Optional[int] = None, *, interpret: Optional[bool] = None) -> TileConfig:
    """Tiles of the softmax statistics kernel (``forward._softmax_stats_kernel``): one head per program
    (HP = G = 1), BLOCK_M query rows against BLOCK_N-key blocks over the whole head dim: one tile of
    BLOCK_D, or BLOCK_D and ``head_dim_tail(d)`` columns where d is the sum of two powers of two (48 = 32 + 16:
    DeepViT-L-384's statistics kernel 43.8-194.6 -> 42.5-171.1 us, static model, against one 64-wide tile).

    256 rows and 4 warps (one warpgroup: each key block's product is four 64-row warpgroup MMAs on
    sm_90, and each thread holds its rows' statistics for all of them); 64-key blocks, two stages.
    Modelled at DeiT-S (sm_90, before the rescale factor moved to the FMA pipe: 121.9 after it):
    23.8-121.4 us, HBM-bound (Q and K read once); 8 warps 23.8-125.3 (the row statistics' and
    addresses' work spread over twice the threads), 16 warps 27.5-134.7 (issue), 128 rows 24.6-142.6,
    128-key blocks 27.3-139.6 (issue), 32-key 27.4-138.5. At head dims above 64 the q tile halves to
    128 rows, and so it does where that pads fewer rows of n_q (N = 577: 640 rows computed, not 768;
    DeepViT-L-384 51.8-208.2 -> 43.8-194.6 us, bound by the exponentials).
    """
    if interpret is None:
        interpret = interpreting()
    block_d = padded_head_dim(d) // 2 if head_dim_tail(d) else padded_head_dim(d)
    if interpret:
        return TileConfig(HP=1, G=1, BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, STATS_BLOCK_N=16, num_warps=4,
                          num_stages=1)
    block_m = 256 if padded_head_dim(d) <= 64 else 128
    if n_q is not None and -(-n_q // 128) * 128 < -(-n_q // block_m) * block_m:
        block_m = 128
    return TileConfig(HP=1, G=1, BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=block_d, STATS_BLOCK_N=64, num_warps=4,
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


def splits_backward_heads(h: int, d: int, *, norm: str, masked: bool, has_dropout: bool, element_size: int,
                          kernel: str, interpret: Optional[bool] = None) -> bool:
    """Whether the backward's ``kernel`` ("dq" or "dkdv") runs its split sweep (``backward._split_dq_sweep``,
    ``backward._split_dkdv_sweep``): 12 heads (16 slots) as two products of 8 and 4 heads, one accumulator per
    group over the whole head dim. Every norm: "none" (the kernels' NORM 0; eval BatchNorm arrives folded),
    "layer" and "batch" (training BatchNorm), whose dM the sweeps form on both groups' rows joined
    (``backward._split_norm_grad``); no mask, no dropout, tensor-core operands on a GPU (fp32 runs narrower tiles
    there; the interpreter runs it in every dtype), and the head dim (d, as the kernels see it) in a tile of 64:
    there the usual kernels' two accumulators split the head dim over programs that each recompute the map, and
    the split ones' two groups take 0.75 d registers a thread; at 128 the split ones' accumulators alone would
    take 96 registers. At 32 the usual sweeps fit whole, and the static model (H100, bf16, DeepViT-16b) picks
    per norm and kernel: without a norm the usual dQ sweep (164.8 against 176.4 us at t_low); with LayerNorm
    both split ones (dQ 334.8-960.7 -> 223.3-745.7 us, dK/dV 495.1-1405.8 -> 254.9-1179.0); with training
    BatchNorm the split dQ sweep (215.7-759.7 -> 209.8-691.5) and the usual dK/dV one (split: 280.3-829.9 ->
    228.5-1024.1, slower at t_high)."""
    if kernel not in ("dq", "dkdv"):
        raise ValueError(f"splits_backward_heads: kernel must be 'dq' or 'dkdv', got {kernel!r}")
    if norm not in ("none", "batch", "layer"):
        raise ValueError(f"splits_backward_heads: norm must be 'none', 'batch' or 'layer' (the backward's), "
                         f"got {norm!r}")
    if interpret is None:
        interpret = interpreting()
    if not (h == 12 and padded_slots(h) == 16 and not masked
            and not has_dropout and (interpret or element_size == 2)):
        return False
    width = padded_head_dim(d)
    return width == 64 or (width == 32 and (norm == "layer" or (norm == "batch" and kernel == "dq")))


def backward_config(n_q: int, n_k: int, d: int, h: int, *, interpret: Optional[bool] = None,
                    shared_limit: Optional[int] = None, element_size: int = 2, kernel: str = "dq",
                    variant: str = "heavy", split_heads: bool = False) -> TileConfig:
    """Tiles of the backward's two kernels (see the module doc and kernels/backward.py).

    kernel "dq": the query-major sweep, two [HP, BLOCK_M, BLOCK_D] accumulators (X and Y) where the
    forward has one; with split_heads (``splits_backward_heads``) one, over the whole head dim. kernel
    "dkdv": the key-major sweep, with the dK and dV accumulators [HP, BLOCK_N, BLOCK_D] over its key
    block (the slots' rows are keys there: BLOCK_N plays the part of BLOCK_M). variant as for
    ``forward_config``.
    """
    if kernel not in ("dq", "dkdv"):
        raise ValueError(f"backward_config: kernel must be 'dq' or 'dkdv', got {kernel!r}")
    if variant not in VARIANTS:
        raise ValueError(f"backward_config: variant must be one of {VARIANTS}, got {variant!r}")
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
        config = TileConfig(HP=hp, G=g, BLOCK_M=16, BLOCK_N=16,
                            BLOCK_D=block_d if kernel == "dkdv" else min(block_d, 32), STATS_BLOCK_N=16,
                            num_warps=FP32_WARPS, num_stages=1)
        return _fit_shared(kernel, config, shared_limit, element_size, variant)
    whole = block_d
    block_d = _acc_chunk(hp, 16, block_d, 2)
    if split_heads:
        split = TileConfig(HP=hp, G=1, BLOCK_M=16, BLOCK_N=16, BLOCK_D=whole, STATS_BLOCK_N=16, num_warps=8,
                           num_stages=1)
        # (where a GPU had too little shared memory for it, the usual tiles, which the launch then runs unsplit)
        if shared_limit is None or shared_bytes(kernel, split, element_size, masked=False,
                                                split_heads=True) <= shared_limit:
            return split
    if kernel == "dq":
        block_m = 32 if variant == "plain" and hp == 8 and 2 * hp * block_d <= 512 else 16
        # Pipelined only for plain calls over the whole head dim (head-dim chunks pipelined every
        # chunk's loads: 155,648 B at D = 128).
        stages = 2 if variant == "plain" and block_d == whole else 1
        config = TileConfig(HP=hp, G=g, BLOCK_M=block_m, BLOCK_N=16, BLOCK_D=block_d, STATS_BLOCK_N=16,
                            num_warps=8, num_stages=stages)
    else:
        config = TileConfig(HP=hp, G=g, BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, STATS_BLOCK_N=16, num_warps=8,
                            num_stages=1)
    return _fit_shared(kernel, config, shared_limit, element_size, variant)
