"""Reading compiled GPU code: SASS disassembly, instruction classes, loops, resource usage.

Everything here works on cubins (ELF files for one GPU architecture) with the tools the triton
wheel ships (``triton/backends/nvidia/bin/{nvdisasm,cuobjdump}``), so no GPU and no CUDA toolkit
are needed. ``nvdisasm -c -gi`` prints one instruction per line, branch targets as labels and,
when the cubin has line information (Triton always emits it; nvcc with ``-lineinfo``), the source
line of each instruction with the chain of inlined calls (``//## File "f", line n inlined at ...``).

Loops are found the way a compiler's back end sees them: a branch to an earlier (or the same)
address closes a loop whose body is [target, branch]; loops nest by containment. A loop the source
unrolls (``tl.static_range``, ``#pragma unroll``, a constant trip count) leaves no backward branch:
its copies are straight-line code in the enclosing body. Software pipelining (Triton's
``num_stages``) puts the first stages' loads before the loop (a prologue, executed once) and the
loads of iteration i + stages - 1 inside iteration i's body, so the body still runs once per
iteration. Anything else (two sibling SASS loops for one source loop when ptxas unrolls with a
remainder, overlapping loops) is reported, never guessed.

Instruction classes (``CLASSES``) follow what bounds a kernel on NVIDIA GPUs: tensor-core ops by
kind, MUFU (exp2, rcp, sqrt... on the special-function units), FP32, conversions, shared memory,
global memory (incl. async copies and TMA), generic-address memory (shared or global,
known only at run time), local memory (spills), barriers, shuffles,
integer/address arithmetic, control flow and the rest.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

CLASSES = ("tensor", "mufu", "fp32", "fp64", "half", "convert", "shared", "global", "generic", "local", "barrier",
           "shuffle", "integer", "control", "other")


@functools.lru_cache(maxsize=None)
def tool(name: str) -> str:
    """Path of ``nvdisasm`` / ``cuobjdump``: the triton wheel's copy, else the CUDA toolkit's."""
    candidates = []
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:  # pragma: no cover - triton comes with every CUDA torch
        pass
    candidates += [shutil.which(name) or "", os.path.join("/usr/local/cuda/bin", name)]
    for path in candidates:
        if path and os.path.exists(path):
            return path
    raise FileNotFoundError(f"{name} not found (it ships in the triton wheel under triton/backends/nvidia/bin)")


Location = Tuple[Tuple[str, int], ...]  # (file, line) innermost first, then the call sites it is inlined at


@dataclass
class Instruction:
    address: int
    guard: str                 # "" or the predicate guard, e.g. "@!P0"
    opcode: str                # with modifiers, e.g. "HMMA.16816.F32.BF16"
    operands: str
    location: Location = ()
    target: Optional[int] = None   # branch/call target address
    base: str = field(init=False, repr=False)  # the opcode without modifiers, e.g. "HMMA"

    def __post_init__(self):
        self.base = self.opcode.split(".")[0]

    @property
    def text(self) -> str:
        return f"{self.guard + ' ' if self.guard else ''}{self.opcode} {self.operands}".strip()


@dataclass
class Loop:
    head: int                  # address of the first instruction of the body
    tail: int                  # address of the backward branch
    location: Location         # source location of the backward branch
    children: List["Loop"] = field(default_factory=list)
    parent: Optional["Loop"] = None

    def contains(self, address: int) -> bool:
        return self.head <= address <= self.tail

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1

    def walk(self) -> Iterable["Loop"]:
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass
class Function:
    name: str
    instructions: List[Instruction]

    @functools.cached_property
    def loops(self) -> List["Loop"]:
        """Top-level loops (each with its nested ``children``), in address order."""
        return loop_forest(self.instructions)

    def all_loops(self) -> List["Loop"]:
        return [loop for top in self.loops for loop in top.walk()]

    def innermost_loop(self) -> Dict[int, Optional[Loop]]:
        """address -> the innermost loop containing it (None outside every loop)."""
        result: Dict[int, Optional[Loop]] = {}
        loops = self.all_loops()
        for ins in self.instructions:
            best = None
            for loop in loops:
                if loop.contains(ins.address) and (best is None or loop.depth > best.depth):
                    best = loop
            result[ins.address] = best
        return result


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_FILE = re.compile(r'^\s*//## File "(.*?)", line (\d+)')
_LABEL = re.compile(r"^([.$][^\s:]+):\s*$")
_SECTION = re.compile(r"^\.text\.(\S+):")
_TARGET = re.compile(r"`\(([^)]+)\)")
_HEX_TARGET = re.compile(r"\b(?:BRA|CALL\.REL(?:\.NOINC)?|BSSY|JMP|BREAK|SSY|PBK)\b.*?\b0x([0-9a-f]+)")


def parse_nvdisasm(text: str) -> Dict[str, Function]:
    """Functions of ``nvdisasm -c [-gi]`` output by name (branch targets resolved to addresses)."""
    functions: Dict[str, Function] = {}
    labels: Dict[str, Dict[str, int]] = {}
    pending_labels: List[str] = []
    current = None
    chain: List[Tuple[str, int]] = []
    fresh_chain = True
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            current = m.group(1)
            functions[current] = Function(current, [])
            labels[current] = {}
            chain, fresh_chain, pending_labels = [], True, []
            continue
        m = _LABEL.match(line)
        if m:
            pending_labels.append(m.group(1))
            continue
        m = _FILE.match(line)
        if m:
            if fresh_chain:
                chain, fresh_chain = [], False
            chain.append((os.path.realpath(m.group(1)), int(m.group(2))))
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            fresh_chain = True
            address = int(m.group(1), 16)
            for label in pending_labels:
                labels[current][label] = address
            pending_labels = []
            body = m.group(2).strip()
            guard = ""
            if body.startswith("@"):
                guard, body = body.split(None, 1)
            opcode, _, operands = body.partition(" ")
            functions[current].instructions.append(Instruction(address, guard, opcode.strip(), operands.strip(),
                                                               tuple(chain)))
    for name, fn in functions.items():
        for ins in fn.instructions:
            m = _TARGET.search(ins.operands)
            if m and m.group(1) in labels[name]:
                ins.target = labels[name][m.group(1)]
            elif ins.base in ("BRA", "CALL", "BSSY", "JMP", "BREAK"):
                h = re.search(r"0x([0-9a-f]+)", ins.operands)
                if h:
                    ins.target = int(h.group(1), 16)
    return functions


def disassemble(cubin: bytes, function: Optional[str] = None) -> Dict[str, Function]:
    """Functions of a cubin (bytes of an ELF for one sm_XX), with line information when it has any; only
    ``function`` (a symbol name) when given: ``nvdisasm -fun`` reads that one function (0.8 s for a 200 KB
    kernel where the whole cubin of 20 such takes 4 s, plus the parsing, which scales alike)."""
    args = [] if function is None else ["-fun", str(function_symbol_index(cubin, function))]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool("nvdisasm"), "-c", "-gi", *args, path], check=True, capture_output=True,
                              text=True).stdout
    return parse_nvdisasm(text)


def loop_forest(instructions: Sequence[Instruction]) -> List[Loop]:
    """Loops from backward branches, nested by containment (several back edges to a head: one loop)."""
    by_head: Dict[int, Loop] = {}
    for ins in instructions:
        if ins.base == "BRA" and ins.target is not None and ins.target <= ins.address:
            if ins.target == ins.address and ins.guard == "" and _is_trap(ins, instructions):
                continue  # "BRA self" after EXIT: the end-of-function trap, not a loop
            loop = by_head.get(ins.target)
            if loop is None or ins.address > loop.tail:
                by_head[ins.target] = Loop(ins.target, ins.address, ins.location)
    loops = sorted(by_head.values(), key=lambda l: (l.head, -l.tail))
    roots: List[Loop] = []
    stack: List[Loop] = []
    for loop in loops:
        while stack and not stack[-1].contains(loop.head):
            stack.pop()
        if stack:
            parent = stack[-1]
            if loop.tail > parent.tail:
                raise ValueError(f"loops overlap without nesting: [{parent.head:#x}, {parent.tail:#x}] and "
                                 f"[{loop.head:#x}, {loop.tail:#x}]")
            loop.parent = parent
            parent.children.append(loop)
        else:
            roots.append(loop)
        stack.append(loop)
    return roots


def _is_trap(ins: Instruction, instructions: Sequence[Instruction]) -> bool:
    index = next(i for i, x in enumerate(instructions) if x.address == ins.address)
    return index > 0 and instructions[index - 1].base in ("EXIT", "BRA", "RET")


# ---- instruction classes --------------------------------------------------------------------------------
_INTEGER = {"IMAD", "IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "LEA", "ISETP", "SEL", "MOV", "IABS",
            "VIADD", "VIADDMNMX", "VIMNMX", "IMNMX", "PRMT", "P2R", "R2P", "PLOP3", "CS2R", "S2R", "S2UR", "LDC",
            "ULDC", "R2UR", "POPC", "FLO", "BREV", "SGXT", "BMSK", "IDP", "IMUL", "XMAD", "ISCADD", "VOTE", "VOTEU",
            "UIADD3", "UIMAD", "ULOP3", "USHF", "UISETP", "UMOV", "USEL", "ULEA", "UPRMT", "UPLOP3", "USGXT", "UFLO",
            "UPOPC", "UBMSK", "UBREV", "ULDC", "S2UR", "MOVM", "UP2UR", "UR2UP", "ELECT", "UVIADD", "UIMNMX"}
_CONTROL = {"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BSSY", "BSYNC", "BREAK", "BMOV", "WARPSYNC", "NOP",
            "YIELD", "KILL", "BPT", "NANOSLEEP", "ACQBULK", "ENDCOLLECTIVE"}
_FP32 = {"FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "FCHK", "FSWZADD", "FSET", "FMNMX3", "FADD2", "FFMA2",
         "FMUL2"}
_FP64 = {"DFMA", "DADD", "DMUL", "DSETP", "DMNMX"}
_HALF = {"HFMA2", "HADD2", "HMUL2", "HMNMX2", "HSETP2", "HSET2"}
_CONVERT = {"F2F", "F2FP", "I2F", "F2I", "I2FP", "FRND", "I2I", "F2IP"}
_SHARED = {"LDS", "STS", "LDSM", "STSM", "ATOMS", "LD", "ST"}  # LD/ST: generic (shared or global; see below)
_GLOBAL = {"LDG", "STG", "LDGSTS", "ATOMG", "ATOM", "RED", "REDG", "UTMALDG", "UTMASTG", "UTMAPF", "UBLKCP",
           "UTMACCTL", "UBLKRED", "CCTL", "LDGDEPBAR", "DEPBAR", "UTMACMDFLUSH", "UBLKPF", "LDGMC", "REDAS"}
_LOCAL = {"LDL", "STL"}
_BARRIER = {"BAR", "MEMBAR", "FENCE", "ERRBAR", "SYNCS", "ARRIVES", "CGAERRBAR", "WARPGROUP", "CCTLL"}
_SHUFFLE = {"SHFL"}
_TENSOR = {"HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA", "BMMA", "QGMMA", "UTCHMMA", "UTCQMMA", "HMMA2"}


def instruction_class(ins: Instruction) -> str:
    base = ins.base
    if base in _TENSOR:
        return "tensor"
    if base == "MUFU":
        return "mufu"
    if base in _FP32:
        return "fp32"
    if base in _FP64:
        return "fp64"
    if base in _HALF:
        return "half"
    if base in _CONVERT:
        return "convert"
    if base in _LOCAL:
        return "local"
    if base in ("LD", "ST"):
        return "generic"  # generic-address loads/stores: shared or global, decided at run time
    if base in _SHARED:
        return "shared"
    if base in _GLOBAL:
        return "global"
    if base in _BARRIER:
        return "barrier"
    if base in _SHUFFLE:
        return "shuffle"
    if base in _INTEGER:
        return "integer"
    if base in _CONTROL:
        return "control"
    return "other"


_MMA_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)")


def tensor_flops(ins: Instruction) -> int:
    """Multiply-add FLOPs (2 per MAC) of one warp's issue of a tensor-core instruction.

    HMMA.16816 = m16n8k16 (4096 FLOPs per warp); HMMA.1688 = m16n8k8; DMMA.884 = m8n8k4.
    HGMMA.64xNxK is one warpgroup operation issued by each of its 4 warps: a quarter per warp.
    """
    op = ins.opcode
    base = ins.base
    if base in ("HMMA", "IMMA", "DMMA", "BMMA"):
        m = re.search(r"\.(\d)(\d)(\d+)\b", op)
        if not m:
            raise ValueError(f"unknown mma shape: {op}")
        digits = m.group(0)[1:]
        if digits.startswith("16816"):
            mm, nn, kk = 16, 8, 16
        elif digits.startswith("1688"):
            mm, nn, kk = 16, 8, 8
        elif digits.startswith("884"):
            mm, nn, kk = 8, 8, 4
        elif digits.startswith("16832"):
            mm, nn, kk = 16, 8, 32
        elif digits.startswith("16864"):
            mm, nn, kk = 16, 8, 64
        else:
            raise ValueError(f"unknown mma shape: {op}")
        return 2 * mm * nn * kk
    m = _MMA_SHAPE.search(op)
    if base in ("HGMMA", "IGMMA", "QGMMA") and m:
        mm, nn, kk = map(int, m.groups())
        return 2 * mm * nn * kk // 4
    if base in _TENSOR:
        raise ValueError(f"unknown tensor-core instruction: {op}")
    return 0


def tensor_kind(ins: Instruction) -> str:
    """Shape and types of a tensor-core op without the accumulator layout noise: 'HMMA.16816.F32.BF16'."""
    return ins.opcode


_WIDTH = re.compile(r"\.(128|64|32|U8|S8|U16|S16)\b")


def memory_bytes(ins: Instruction) -> int:
    """Bytes one warp-wide issue moves (32 lanes; LDSM/STSM: the matrices; HGMMA: its shared-memory operands).

    Every lane counted: masked-off lanes of a predicated load are not known statically. The one guard known
    statically is ``@!PT`` (never true): ptxas pads cp.async sequences with ``@!PT LDS RZ, [RZ]``, an issue slot
    that moves nothing.
    """
    if ins.guard == "@!PT":
        return 0
    base = ins.base
    op = ins.opcode
    if base in ("LDSM", "STSM"):
        m = re.search(r"\.(\d+)$", op)
        count = int(m.group(1)) if m and m.group(1) in ("1", "2", "4") else 1
        return 128 * count  # one 8x8 matrix of 16-bit elements = 128 bytes
    if base == "HGMMA":
        return hgmma_shared_bytes(ins) // 4
    if base in ("UTMALDG", "UTMASTG", "UBLKCP"):
        return 0  # bytes depend on the tensor map (not in the instruction); counted from the launch's tensors
    if base in _SHARED or base in _GLOBAL or base in _LOCAL or base in ("LD", "ST"):
        if base in ("LDGDEPBAR", "DEPBAR", "CCTL"):
            return 0
        widths = _WIDTH.findall(op)
        width = 4
        for w in widths:
            width = {"128": 16, "64": 8, "32": 4, "U8": 1, "S8": 1, "U16": 2, "S16": 2}[w]
        if base in ("RED", "REDG", "ATOM", "ATOMG", "ATOMS") and (".F64" in op or ".64" in op):
            width = 8
        return 32 * width
    return 0


def hgmma_shared_bytes(ins: Instruction) -> int:
    """Shared-memory operand bytes of one warpgroup wgmma: B always (k x N), A too when it is a descriptor."""
    m = _MMA_SHAPE.search(ins.opcode)
    if not m:
        return 0
    mm, nn, kk = map(int, m.groups())
    elem = 1 if re.search(r"\.(E4M3|E5M2|S8|U8)", ins.opcode) else 2
    operands = [o.strip() for o in ins.operands.split(",")]
    a_in_shared = len(operands) > 1 and operands[1].startswith("gdesc")
    return nn * kk * elem + (mm * kk * elem if a_in_shared else 0)


# ---- resource usage ---------------------------------------------------------------------------------------
@dataclass
class Resources:
    registers: int
    stack: int          # bytes of local stack per thread (spills and local arrays)
    local: int
    shared_static: int  # bytes of static shared memory (incl. the compiler's reservation)


def resource_usage(cubin: bytes) -> Dict[str, Resources]:
    """``cuobjdump -res-usage`` of a cubin, by function."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool("cuobjdump"), "-res-usage", path], check=True, capture_output=True,
                              text=True).stdout
    return parse_resource_usage(text)


def parse_resource_usage(text: str) -> Dict[str, Resources]:
    result = {}
    function = None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            function = m.group(1)
            continue
        if function is not None and "REG:" in line:
            values = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            result[function] = Resources(values["REG"], values.get("STACK", 0), values.get("LOCAL", 0),
                                         values.get("SHARED", 0))
            function = None
    return result


def spill_bytes(resources: Resources, function: Function) -> int:
    """Bytes of local memory per thread used for spills: the stack frame when the code touches local memory."""
    touches_local = any(ins.base in _LOCAL for ins in function.instructions)
    return max(resources.stack, resources.local) if touches_local else 0


# ---- ELF sections and symbols -------------------------------------------------------------------------------
def _elf_sections(cubin: bytes) -> List[Tuple[str, int, int, int, int]]:
    """(name, type, offset, size, link) of every section of a 64-bit little-endian ELF (a cubin)."""
    import struct

    if cubin[:4] != b"\x7fELF":
        return []
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    raw = [struct.unpack_from("<IIQQQQI", cubin, shoff + i * shentsize) for i in range(shnum)]
    names_offset = raw[shstrndx][4]

    return [(_c_string(cubin, names_offset + name).decode(errors="replace"), kind, offset, size, link)
            for name, kind, _, _, offset, size, link in raw]


def _c_string(data: bytes, offset: int) -> bytes:
    """The NUL-terminated string at ``offset`` of an ELF string table."""
    return data[offset:data.index(b"\0", offset)]


def function_symbol_index(cubin: bytes, function: str) -> int:
    """Index of ``function``'s FUNC symbol in the cubin's symbol table (what ``nvdisasm -fun`` takes)."""
    import struct

    sections = _elf_sections(cubin)
    for _, kind, offset, size, link in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        strings = sections[link][2]
        for index in range(size // 24):  # Elf64_Sym: name, info, other, shndx, value, size
            name, info = struct.unpack_from("<IB", cubin, offset + 24 * index)
            if info & 0xF == 2 and _c_string(cubin, strings + name) == function.encode():
                return index
    raise KeyError(f"no function {function} in the cubin's symbol table")


# ---- constant banks ----------------------------------------------------------------------------------------
def constant_banks(cubin: bytes, function: str) -> Dict[int, bytes]:
    """Initial contents of a kernel's compiler constant banks (``.nv.constant<N>.<function>`` sections of the
    ELF, N > 0: literals the code reads as c[0xN][...]); bank 0 (the launch's parameters) is not included."""
    banks = {}
    for name, _, offset, size, _ in _elf_sections(cubin):
        m = re.match(r"^\.nv\.constant(\d+)\.(.+)$", name)
        if m and m.group(2) == function and int(m.group(1)) > 0:
            banks[int(m.group(1))] = bytes(cubin[offset:offset + size])
    return banks


# ---- extension cubins --------------------------------------------------------------------------------------
def extract_cubins(library: str, arch: str) -> List[bytes]:
    """Every cubin for ``arch`` ("sm_90") embedded in a shared library (``cuobjdump -xelf``)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([tool("cuobjdump"), "-xelf", "all", os.path.abspath(library)], check=True, cwd=tmp,
                       capture_output=True)
        result = []
        for name in sorted(os.listdir(tmp)):
            if name.endswith(f".{arch}.cubin"):
                with open(os.path.join(tmp, name), "rb") as f:
                    result.append(f.read())
    return result


def class_counts(instructions: Iterable[Instruction]) -> Counter:
    return Counter(instruction_class(ins) for ins in instructions)
