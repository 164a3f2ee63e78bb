"""Hardware constants and the cost model of the static model (``python -m benchmarks.static_model``).

Every constant has its source next to it. Where a figure is not published or sources disagree,
the comment says so and the model takes the conservative one (the one that makes kernels slower).
All times the model produces are *predictions*, never measurements.

The model, per kernel launch (see :func:`launch_time`):

* occupancy: blocks per SM from registers (allocated per warp in units of 256), shared memory
  (per block: what the kernel asks for plus the 1 KB the runtime reserves per block on sm_80+),
  threads (64 warps per SM) and the 32-blocks limit;
* waves: ``ceil(programs / (SMs * blocks_per_sm))``; the busiest SM runs ``waves * blocks_per_sm``
  programs (wave quantization: a partial last wave costs a whole one);
* per SM, the time of each resource = work of its programs / the SM's rate: instruction issue
  (4 warp instructions per clock, one per sub-partition), tensor cores (FLOPs at the rate of the
  instruction kind: ``mma.sync`` = HMMA or ``wgmma`` = HGMMA), MUFU, FP32, FP64, integer,
  conversions, shuffles, shared memory (bytes at 128 B/clock, no bank conflicts assumed); chip-wide:
  L2 and HBM. HBM moves the unique bytes of the tensors a launch touches (each once per direction);
  L2 moves at least those (the lower bound) and at most every byte the loads, stores and atomics
  request, every lane counted (the upper bound: re-reads of K/V by other programs are L2 hits);
* ``t_low`` = max over those resources (perfect overlap) and ``t_high`` = the sum of the per-class
  pipe times, L2 and HBM (no overlap), plus one launch gap per kernel. Latency that too few warps
  cannot hide is not modelled beyond that bound; the GPU session (``benchmarks/gpu_session.sh``)
  measures the same launches so the two can be compared.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional

# ---- sources --------------------------------------------------------------------------------------------
H100_DATASHEET = "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM: 989 TFLOPS dense BF16, 3.35 TB/s HBM3)"
H200_DATASHEET = "https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM: 989 TFLOPS dense BF16, 4.8 TB/s HBM3e)"
HOPPER_BLOG = ("https://developer.nvidia.com/blog/nvidia-hopper-architecture-in-depth/ (132 SMs on H100 SXM5, "
               "228 KB shared memory per SM, 50 MB L2, 256 KB register file per SM)")
A100_WHITEPAPER = ("https://images.nvidia.com/aem-dam/en-zz/Solutions/data-center/nvidia-ampere-architecture-"
                   "whitepaper.pdf (A100: 108 SMs, 1410 MHz, 312 TFLOPS dense BF16, 164 KB shared memory per SM)")
A100_DATASHEET = "https://www.nvidia.com/en-us/data-center/a100/ (A100 80GB SXM: 2,039 GB/s HBM2e)"
CUDA_GUIDE_THROUGHPUT = ("https://docs.nvidia.com/cuda/cuda-c-programming-guide/#arithmetic-instructions "
                         "(results per clock per SM, compute capability 8.0 / 9.0)")
CUDA_GUIDE_LIMITS = ("https://docs.nvidia.com/cuda/cuda-c-programming-guide/#features-and-technical-specifications "
                     "(64 K registers, 2048 threads, 32 blocks per SM; shared memory per SM / per block; 1 KB "
                     "reserved per block)")
LUO_2024 = ("W. Luo et al., 'Benchmarking and Dissecting the Nvidia Hopper GPU Architecture', IPDPS 2024, "
            "arXiv:2402.13499 (wgmma reaches the dense peak; the legacy mma.sync path does not)")
FA3_2024 = ("J. Shah et al., 'FlashAttention-3', arXiv:2407.08608 (FlashAttention-2, built on mma.sync, reaches "
            "~35% of H100's peak)")
CHIPS_AND_CHEESE_H100 = ("https://chipsandcheese.com/2023/07/02/nvidias-h100-funny-l2-and-tons-of-bandwidth/ "
                         "(L2 bandwidth measured on H100 PCIe, 114 SMs: ~5.5 TB/s)")
KONIGES_2023 = ("PMC10448217, Table 3 (L2 bandwidth from 5120 B/clock: A100 7.2 TB/s at 1410 MHz; shared memory "
                "128 B/clock/SM)")


@dataclass(frozen=True)
class GPU:
    """One GPU's constants. Rates are per SM per clock unless named otherwise."""

    name: str
    arch: int                       # compute capability of the SASS it runs (90, 80)
    sms: int
    clock_ghz: float
    hbm_tb_s: float
    l2_tb_s: float
    issue_per_clk: float            # warp instructions issued per SM per clock (4 sub-partitions x 1)
    mma_sync_flops_per_clk: float   # dense bf16/fp16 FLOPs per SM per clock on HMMA (mma.sync)
    wgmma_flops_per_clk: float      # dense bf16/fp16 FLOPs per SM per clock on HGMMA (wgmma); 0 = none
    dmma_flops_per_clk: float       # fp64 tensor-core FLOPs per SM per clock
    lanes_per_clk: Mapping[str, float]  # thread-results per SM per clock by instruction class
    shared_bytes_per_clk: float
    registers_per_sm: int = 65536
    max_registers_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    shared_per_sm: int = 0          # bytes a whole SM can give its blocks
    shared_per_block: int = 0       # bytes one block may opt into
    reserved_shared_per_block: int = 1024
    launch_us: float = 2.0          # gap one more kernel launch adds (t_high only)
    sources: Mapping[str, str] = field(default_factory=dict)


# Thread-results per SM per clock by instruction class (CUDA C Programming Guide, "Arithmetic
# Instructions" table, compute capability 8.0 and 9.0). FP32 add/mul/FMA: 64 on 8.0, 128 on 9.0;
# 32-bit integer add/logic/shift/compare and IMAD: 64; fp64: 32 (8.0) and 64 (9.0); MUFU (exp2,
# log2, rcp, rsqrt, sin, cos): 16; conversions: 16 (the table's rate for 8.x/9.0, which it gives for
# conversions to/from 64-bit and between 32-bit types; F2FP packs of two fp32 into bf16x2 are not
# listed: taking 16 is the conservative choice); warp shuffle: 32; half2 FMA: 128 (8.0) / 256 (9.0)
# thread-results (each of two halves). Control, barrier and other instructions only take an issue slot.
_LANES_90 = {"fp32": 128, "fp64": 64, "integer": 64, "mufu": 16, "convert": 16, "shuffle": 32, "half": 256,
             "control": 128, "barrier": 128, "other": 128, "global": 128, "generic": 128, "shared": 128,
             "local": 128}
_LANES_80 = dict(_LANES_90, fp32=64, fp64=32, half=128)

# H100 SXM5: 132 SMs (HOPPER_BLOG). Clock: NVIDIA's dense tensor figure, 989.4 TFLOPS BF16 =
# 132 SMs x 4096 FLOP/clock x 1.83 GHz, implies 1830 MHz; the maximum boost is 1980 MHz (which the
# FP32 figure 66.9 TFLOPS = 132 x 256 x 1.98 GHz uses). We use 1830 MHz throughout (conservative).
# wgmma: 4096 dense bf16 FLOPs per SM per clock (the datasheet figure divided as above).
# mma.sync: not specified by NVIDIA for Hopper; microbenchmarks (LUO_2024) and FlashAttention-3
# (FA3_2024) find the legacy path well below wgmma. We take half of the wgmma rate, 2048 FLOP/clock/SM
# (A100's per-SM rate), the conservative end of what is reported. fp64 tensor (DMMA): 66.9 TFLOPS =
# 132 x 256 x 1.98 GHz -> 256 FLOP/clock/SM.
# HBM: H100 SXM 3.35 TB/s (H100_DATASHEET), H200 4.8 TB/s (H200_DATASHEET): peak figures.
# L2: NVIDIA publishes no Hopper L2 bandwidth. 5120 B/clock (the A100 figure, KONIGES_2023) would give
# 9.4 TB/s at 1830 MHz; Chips and Cheese measured ~5.5 TB/s on the smaller H100 PCIe. We take 5.5 TB/s.
# Shared memory: 32 banks x 4 B = 128 B per clock per SM (KONIGES_2023).
# Limits (CUDA_GUIDE_LIMITS, cc 9.0): 228 KB shared memory per SM, 227 KB per block, 1 KB reserved per
# block, 64 K 32-bit registers, 64 warps, 32 blocks per SM.
_HOPPER = dict(arch=90, sms=132, clock_ghz=1.83, l2_tb_s=5.5, issue_per_clk=4, mma_sync_flops_per_clk=2048,
               wgmma_flops_per_clk=4096, dmma_flops_per_clk=256, lanes_per_clk=_LANES_90, shared_bytes_per_clk=128,
               shared_per_sm=233472, shared_per_block=232448)
_HOPPER_SOURCES = {"sms": HOPPER_BLOG, "clock_ghz": H100_DATASHEET, "wgmma_flops_per_clk": H100_DATASHEET,
                   "mma_sync_flops_per_clk": f"assumed half of wgmma; see {LUO_2024}; {FA3_2024}",
                   "l2_tb_s": CHIPS_AND_CHEESE_H100, "lanes_per_clk": CUDA_GUIDE_THROUGHPUT,
                   "shared_bytes_per_clk": KONIGES_2023, "limits": CUDA_GUIDE_LIMITS,
                   "launch_us": "assumed 2 us per extra kernel launch (calibrated by the GPU session)"}

H100_SXM = GPU(name="H100-SXM", hbm_tb_s=3.35, sources=dict(_HOPPER_SOURCES, hbm_tb_s=H100_DATASHEET), **_HOPPER)
H200 = GPU(name="H200", hbm_tb_s=4.8, sources=dict(_HOPPER_SOURCES, hbm_tb_s=H200_DATASHEET), **_HOPPER)

# A100 SXM4 80GB (A100_WHITEPAPER, A100_DATASHEET): 108 SMs at 1410 MHz; 312 TFLOPS dense BF16 =
# 108 x 2048 x 1.41 GHz (mma.sync; no wgmma); fp64 tensor 19.5 TFLOPS -> 128 FLOP/clock/SM; HBM2e
# 2.039 TB/s; L2 7.2 TB/s (5120 B/clock, KONIGES_2023: a peak figure, no measured one found); 164 KB
# shared memory per SM (166,912 B per block), 1 KB reserved per block.
A100_SXM = GPU(name="A100-SXM", arch=80, sms=108, clock_ghz=1.41, hbm_tb_s=2.039, l2_tb_s=7.2, issue_per_clk=4,
               mma_sync_flops_per_clk=2048, wgmma_flops_per_clk=0, dmma_flops_per_clk=128,
               lanes_per_clk=_LANES_80, shared_bytes_per_clk=128, shared_per_sm=167936, shared_per_block=166912,
               sources={"all": A100_WHITEPAPER, "hbm_tb_s": A100_DATASHEET, "l2_tb_s": KONIGES_2023,
                        "lanes_per_clk": CUDA_GUIDE_THROUGHPUT, "limits": CUDA_GUIDE_LIMITS,
                        "launch_us": "assumed 2 us per extra kernel launch"})

GPUS = {g.name: g for g in (H100_SXM, H200, A100_SXM)}
GPUS_FOR_ARCH = {90: (H100_SXM, H200), 80: (A100_SXM,)}


# ---- occupancy --------------------------------------------------------------------------------------------
def blocks_per_sm(gpu: GPU, registers: int, threads: int, shared: int) -> int:
    """Resident blocks per SM (CUDA occupancy rules); 0 when one block does not fit.

    registers: per thread (allocated per warp in units of 256 registers); shared: bytes per block
    the kernel asks for (static + dynamic); the runtime adds ``reserved_shared_per_block``.
    """
    warps = math.ceil(threads / 32)
    if registers > gpu.max_registers_per_thread or shared > gpu.shared_per_block or warps > gpu.max_warps_per_sm:
        return 0
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_registers = gpu.registers_per_sm // (regs_per_warp * warps)
    by_threads = gpu.max_warps_per_sm // warps
    per_block = shared + gpu.reserved_shared_per_block
    by_shared = gpu.shared_per_sm // per_block
    return max(0, min(gpu.max_blocks_per_sm, by_registers, by_threads, by_shared))


# ---- work of one program --------------------------------------------------------------------------------------
@dataclass
class Work:
    """What one program (thread block) of a launch does, in warp instructions, FLOPs and bytes."""

    instructions: Dict[str, float] = field(default_factory=dict)   # warp instructions by class
    hmma_flops: float = 0.0        # executed on mma.sync (HMMA, incl. padding)
    hgmma_flops: float = 0.0       # executed on wgmma (HGMMA)
    dmma_flops: float = 0.0        # fp64 tensor cores
    shared_bytes: float = 0.0      # shared memory / L1 traffic: LDS/STS/LDSM/STSM, cp.async writes, wgmma operands, spills
    l2_bytes: float = 0.0          # bytes requested from L2 by loads, stores, atomics (every lane)

    @property
    def warp_instructions(self) -> float:
        return sum(self.instructions.values())

    def scaled(self, factor: float) -> "Work":
        return Work({k: v * factor for k, v in self.instructions.items()}, self.hmma_flops * factor,
                    self.hgmma_flops * factor, self.dmma_flops * factor, self.shared_bytes * factor,
                    self.l2_bytes * factor)

    def add(self, other: "Work") -> None:
        for k, v in other.instructions.items():
            self.instructions[k] = self.instructions.get(k, 0.0) + v
        self.hmma_flops += other.hmma_flops
        self.hgmma_flops += other.hgmma_flops
        self.dmma_flops += other.dmma_flops
        self.shared_bytes += other.shared_bytes
        self.l2_bytes += other.l2_bytes


@dataclass
class LaunchTime:
    t_low_us: float
    t_high_us: float
    resources_us: Dict[str, float]     # time of each resource alone (the bound is the largest)
    bound: str                         # the resource that sets t_low
    blocks_per_sm: int
    waves: int


def launch_time(gpu: GPU, work: Work, programs: int, threads: int, registers: int, shared: int,
                hbm_bytes: float) -> LaunchTime:
    """Predicted time of one launch of ``programs`` programs doing ``work`` each (see the module doc)."""
    bps = blocks_per_sm(gpu, registers, threads, shared)
    if bps == 0:
        raise ValueError(f"a block of {threads} threads, {registers} registers, {shared} B of shared memory does "
                         f"not fit one SM of {gpu.name}")
    waves = math.ceil(programs / (gpu.sms * bps))
    per_sm_programs = min(programs, waves * bps)
    cycles_per_us = gpu.clock_ghz * 1e3
    res: Dict[str, float] = {}
    total_instr = work.warp_instructions
    res["issue"] = per_sm_programs * total_instr / gpu.issue_per_clk / cycles_per_us
    tensor_cycles = work.hmma_flops / gpu.mma_sync_flops_per_clk
    if work.hgmma_flops:
        if not gpu.wgmma_flops_per_clk:
            raise ValueError(f"{gpu.name} has no wgmma")
        tensor_cycles += work.hgmma_flops / gpu.wgmma_flops_per_clk
    if work.dmma_flops:
        tensor_cycles += work.dmma_flops / gpu.dmma_flops_per_clk
    res["tensor"] = per_sm_programs * tensor_cycles / cycles_per_us
    pipe_sum = 0.0
    for cls, count in work.instructions.items():
        if cls == "tensor":
            continue
        # A warp instruction of this class occupies its pipe 32 / lanes clocks and an issue slot.
        rate = min(gpu.issue_per_clk, gpu.lanes_per_clk.get(cls, 128) / 32)
        t = per_sm_programs * count / rate / cycles_per_us
        pipe_sum += t
        if cls in ("mufu", "fp32", "fp64", "integer", "convert", "shuffle", "half"):
            res[cls] = t
    res["shared"] = per_sm_programs * work.shared_bytes / gpu.shared_bytes_per_clk / cycles_per_us
    # L2: the lower bound moves only the unique bytes through it (every re-read an L1 hit); the upper bound
    # every byte the loads, stores and atomics request, every lane counted (predicated-off lanes too).
    l2_requested = programs * work.l2_bytes / (gpu.l2_tb_s * 1e6)
    res["l2"] = min(l2_requested, hbm_bytes / (gpu.l2_tb_s * 1e6))
    res["hbm"] = hbm_bytes / (gpu.hbm_tb_s * 1e6)
    t_low = max(res.values())
    bound = max(res, key=res.get)
    t_high = pipe_sum + res["tensor"] + res["shared"] + max(l2_requested, res["l2"]) + res["hbm"] + gpu.launch_us
    return LaunchTime(t_low, t_high, res, bound, bps, waves)


def eager_op_time(gpu: GPU, bytes_moved: float, flops: float, tensor: bool) -> tuple:
    """(t_low, t_high) in us of one eager kernel: max / sum of bytes at HBM bandwidth and FLOPs at the
    dense tensor-core rate (matmuls, at wgmma's rate where the GPU has it: cuBLAS uses it) or the
    FP32 rate (elementwise), plus the launch gap in t_high."""
    rate = (gpu.wgmma_flops_per_clk or gpu.mma_sync_flops_per_clk) if tensor else 2 * gpu.lanes_per_clk["fp32"]
    t_mem = bytes_moved / (gpu.hbm_tb_s * 1e6)
    t_flop = flops / (rate * gpu.sms * gpu.clock_ghz * 1e3)
    return max(t_mem, t_flop), t_mem + t_flop + gpu.launch_us


def constants_table() -> str:
    """Markdown table of every GPU's constants and their sources (for the README and --constants)."""
    rows = ["| constant | " + " | ".join(g.name for g in GPUS.values()) + " |",
            "|---|" + "---|" * len(GPUS)]

    def row(label, fn):
        rows.append(f"| {label} | " + " | ".join(fn(g) for g in GPUS.values()) + " |")

    row("SASS arch", lambda g: f"sm_{g.arch}")
    row("SMs", lambda g: str(g.sms))
    row("clock (GHz)", lambda g: f"{g.clock_ghz:g}")
    row("issue (warp instr / clk / SM)", lambda g: f"{g.issue_per_clk:g}")
    row("mma.sync bf16 (FLOP / clk / SM)", lambda g: f"{g.mma_sync_flops_per_clk:g}")
    row("wgmma bf16 (FLOP / clk / SM)", lambda g: f"{g.wgmma_flops_per_clk:g}" if g.wgmma_flops_per_clk else "-")
    row("MUFU (results / clk / SM)", lambda g: f"{g.lanes_per_clk['mufu']:g}")
    row("FP32 (results / clk / SM)", lambda g: f"{g.lanes_per_clk['fp32']:g}")
    row("integer (results / clk / SM)", lambda g: f"{g.lanes_per_clk['integer']:g}")
    row("conversions (results / clk / SM)", lambda g: f"{g.lanes_per_clk['convert']:g}")
    row("shared memory (B / clk / SM)", lambda g: f"{g.shared_bytes_per_clk:g}")
    row("L2 (TB/s)", lambda g: f"{g.l2_tb_s:g}")
    row("HBM (TB/s)", lambda g: f"{g.hbm_tb_s:g}")
    row("registers / SM", lambda g: str(g.registers_per_sm))
    row("shared memory / SM, / block (B)", lambda g: f"{g.shared_per_sm}, {g.shared_per_block}")
    row("launch gap (us, t_high)", lambda g: f"{g.launch_us:g}")
    return "\n".join(rows)


SOURCES = (H100_DATASHEET, H200_DATASHEET, HOPPER_BLOG, A100_WHITEPAPER, A100_DATASHEET, CUDA_GUIDE_THROUGHPUT,
           CUDA_GUIDE_LIMITS, LUO_2024, FA3_2024, CHIPS_AND_CHEESE_H100, KONIGES_2023)
