"""One compiled kernel launch in the static model: resources, instruction counts, bytes, predicted time.

A :class:`KernelModel` is built from a kernel's SASS (``benchmarks.sass``), how many times each
SASS loop runs per program (declared by the kernel's source, ``benchmarks.source_loops``, or
counted by other means for the CUDA programs), the launch's grid and block, and the unique bytes
of the tensors it touches. ``times(gpu)`` applies ``benchmarks.cost_model``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks import cost_model, sass


@dataclass
class LoopReport:
    """One SASS loop: where it is, its source, its trip count per entry and its body per iteration."""

    head: int
    tail: int
    depth: int
    source: str                  # "file:line" of the source loop it was matched to
    trips: float                 # iterations per entry (per warp)
    per_iteration: Dict[str, int]  # static instructions of the body by class (and tensor ops by opcode),
    #                                inner loops excluded; what one warp issues per iteration


@dataclass
class KernelModel:
    backend: str
    name: str                     # the compiled kernel's name
    phase: str                    # "fwd" or "bwd": the part of the call it belongs to
    arch: int
    programs: int
    threads: int
    registers: int
    spill_bytes: int
    shared_bytes: int             # per block: what the launch asks for (static + dynamic)
    work: cost_model.Work         # per program
    hbm_bytes: float              # unique bytes of the tensors the launch reads and writes (atomics: twice)
    loops: List[LoopReport] = field(default_factory=list)
    tensor_kinds: Dict[str, float] = field(default_factory=dict)  # warp instructions per program by opcode
    note: str = ""

    @property
    def warp_instructions(self) -> float:
        return self.work.warp_instructions * self.programs

    @property
    def tensor_flops(self) -> float:
        return (self.work.hmma_flops + self.work.hgmma_flops + self.work.dmma_flops) * self.programs

    @property
    def l2_bytes(self) -> float:
        return self.work.l2_bytes * self.programs

    def blocks_per_sm(self, gpu: cost_model.GPU) -> int:
        return cost_model.blocks_per_sm(gpu, self.registers, self.threads, self.shared_bytes)

    def times(self, gpu: cost_model.GPU) -> cost_model.LaunchTime:
        return cost_model.launch_time(gpu, self.work, self.programs, self.threads, self.registers,
                                      self.shared_bytes, self.hbm_bytes)


def work_from_sass(function: sass.Function, multiplicity: Dict[int, float],
                   generic_global: Optional[Dict[int, float]] = None) -> Tuple[cost_model.Work, Dict[str, float]]:
    """Per-program work: every instruction weighted by how many warps execute it how often (``multiplicity``
    by address: warps x trips of the enclosing loops). ``generic_global``: of a generic-address load or
    store's issues, how many went to global memory (the rest to shared); unknown: all to shared.
    Returns (work, warp instructions by tensor opcode)."""
    work = cost_model.Work()
    kinds: Dict[str, float] = {}
    for ins in function.instructions:
        n = multiplicity.get(ins.address, 0.0)
        if n == 0.0:
            continue
        cls = sass.instruction_class(ins)
        work.instructions[cls] = work.instructions.get(cls, 0.0) + n
        if cls == "tensor":
            flops = sass.tensor_flops(ins) * n
            if ins.base in ("HGMMA", "IGMMA", "QGMMA"):
                work.hgmma_flops += flops
                work.shared_bytes += sass.memory_bytes(ins) * n
            elif ins.base == "DMMA":
                work.dmma_flops += flops
            else:
                work.hmma_flops += flops
            kinds[ins.opcode] = kinds.get(ins.opcode, 0.0) + n
        elif cls == "generic":
            to_global = min(n, (generic_global or {}).get(ins.address, 0.0))
            work.l2_bytes += sass.memory_bytes(ins) * to_global
            work.shared_bytes += sass.memory_bytes(ins) * (n - to_global)
        elif cls in ("shared", "local"):
            work.shared_bytes += sass.memory_bytes(ins) * n
        elif cls == "global":
            b = sass.memory_bytes(ins) * n
            work.l2_bytes += b
            if ins.base == "LDGSTS":
                work.shared_bytes += b  # cp.async writes what it fetched into shared memory
    return work, kinds


def uniform_multiplicity(function: sass.Function, trips: Dict[Tuple[int, int], float], warps: int) -> Dict[int, float]:
    """warps x the product of the trip counts of every loop around each instruction (code every warp runs)."""
    loops = function.all_loops()
    result = {}
    # Nothing after the last EXIT runs when nothing is called there (the padding NOPs and the trap branch).
    exits = [ins.address for ins in function.instructions if ins.base == "EXIT"]
    last_exit = max(exits) if exits and not any(ins.base == "CALL" for ins in function.instructions) else None
    for ins in function.instructions:
        if last_exit is not None and ins.address > last_exit:
            result[ins.address] = 0.0
            continue
        n = float(warps)
        for loop in loops:
            if loop.contains(ins.address):
                n *= trips[(loop.head, loop.tail)]
        result[ins.address] = n
    return result


def loop_reports(function: sass.Function, trips: Dict[Tuple[int, int], float],
                 sources: Dict[Tuple[int, int], str]) -> List[LoopReport]:
    reports = []
    for loop in function.all_loops():
        inner = [c for c in loop.walk() if c is not loop]
        body = [ins for ins in function.instructions
                if loop.contains(ins.address) and not any(c.contains(ins.address) for c in inner)]
        per_iteration = dict(sass.class_counts(body))
        for ins in body:  # tensor-core instructions by kind too (HMMA.16816.F32.BF16, HGMMA.64x64x16...)
            if sass.instruction_class(ins) == "tensor":
                per_iteration[ins.opcode] = per_iteration.get(ins.opcode, 0) + 1
        reports.append(LoopReport(loop.head, loop.tail, loop.depth, sources.get((loop.head, loop.tail), ""),
                                  trips[(loop.head, loop.tail)], per_iteration))
    return reports


def tensor_footprint(t) -> int:
    """Bytes of storage a (possibly strided or broadcast) tensor view spans."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return span * t.element_size()


def unique_bytes(tensors_and_kinds: Sequence[Tuple[object, set]]) -> float:
    """HBM bytes: each distinct tensor once per direction (read; written; atomics read and write)."""
    seen: Dict[int, Tuple[object, set]] = {}
    for t, kinds in tensors_and_kinds:
        key = id(t._base if getattr(t, "_base", None) is not None else t)
        if key in seen:
            seen[key][1].update(kinds)
        else:
            seen[key] = (t, set(kinds))
    total = 0.0
    for t, kinds in seen.values():
        directions = ("read" in kinds) + ("write" in kinds) + 2 * ("atomic" in kinds)
        total += tensor_footprint(t) * min(directions, 2)
    return total
