"""Counting what a compiled CUDA kernel executes, without a GPU: a control-flow emulator for SASS.

Hand-written CUDA has many runtime loops (item loops over threads, head groups, tiles of a plan
chosen at run time) whose trip counts depend on the launch's parameters and on the thread. Rather
than declare each, ``run_block`` executes the kernel's SASS for one thread block, every warp, on
the values the launch gives it (the kernel parameter bytes in constant bank 0, the block and thread
indices) and counts every warp-instruction issued:

* each warp is 32 lanes of registers (``numpy`` vectors) with a *known* flag per lane: integers,
  predicates and addresses derived from parameters and indices are known; anything loaded from
  global memory, or computed from it, is unknown (floating-point data never steers these kernels'
  loops);
* divergence follows the minimum-PC rule: the warp issues the instruction at the lowest program
  counter among its live lanes, for the lanes there (so both sides of a divergent branch are
  issued, loops run as long as their longest lane, lanes reconverge where the code merges);
* shared memory is modelled byte by byte (a known value stored by one warp is known to the warp
  that loads it after the barrier); a warp that reaches a CTA barrier waits there for the others;
* the block's warps sit side by side in one set of arrays (32 x warps lanes) and the step issues
  the lowest program counter among all running lanes: for each warp with a lane there, that is its
  own minimum-PC choice, so every warp issues the sequence it would issue alone (counts are per
  warp), while warps at the same program counter share one numpy operation. Between two barriers
  the warps' steps interleave; that differs from running them one after another only for a program
  with a shared-memory race, which these kernels (checked for races by their host emulator) do not have;
* ``CALL``/``RET`` follow the return address in the register the code passes.

A branch on an unknown predicate is a decision the emulator cannot make: it assumes the branch is
not taken and counts the event (``Counts.unknown_branches``), except ``FCHK`` (the check for a
division's slow path: the fast path is assumed) — tests assert where these occur. Instructions it
has no semantics for are executed as "writes an unknown value" and listed in ``Counts.unmodelled``.
"""
from __future__ import annotations

import re
import struct
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from benchmarks import sass

W = 32                 # lanes per warp
NREG = 256
RZ = 255
URZ = 63
PT = 7
MASK32 = np.uint64(0xFFFFFFFF)

# ---- operands -------------------------------------------------------------------------------------------------
_REG = re.compile(r"^(-)?(\|)?(~)?(-)?(R\d+|RZ|UR\d+|URZ)(\.reuse)?(\.(?:H0|H1|B0|B1|B2|B3|X4|X8|X16|64|U32|"
                  r"H0_H0|H1_H1|F32|ROW|COL))*(\|)?$")


@dataclass
class Operand:
    kind: str                  # R, UR, P, UP, imm, c, mem, SR, other
    index: int = 0
    neg: bool = False
    abs: bool = False
    inv: bool = False          # ~ (bitwise not) or ! (predicate not)
    text: str = ""
    offset: int = 0
    parts: tuple = ()          # mem: (kind, index, scale) terms; c: register index term
    bank: int = 0
    half: str = ""             # .H0 / .H1 / .B0.. selectors


def _reg_index(tok: str) -> Tuple[str, int]:
    if tok == "RZ":
        return "R", RZ
    if tok == "URZ":
        return "UR", URZ
    if tok.startswith("UR"):
        return "UR", int(tok[2:])
    return "R", int(tok[1:])


def parse_operand(tok: str) -> Operand:
    tok = tok.strip()
    if not tok:
        return Operand("other", text=tok)
    if tok in ("PT", "!PT", "UPT", "!UPT") or re.match(r"^!?U?P\d$", tok):
        inv = tok.startswith("!")
        t = tok.lstrip("!")
        if t.startswith("UP"):
            return Operand("UP", PT if t == "UPT" else int(t[2:]), inv=inv)
        return Operand("P", PT if t == "PT" else int(t[1:]), inv=inv)
    if tok.startswith("SR_"):
        return Operand("SR", text=tok)
    m = re.match(r"^(-)?c\[(0x[0-9a-f]+)\]\[(.+)\]$", tok)
    if m:
        bank = int(m.group(2), 16)
        inner = m.group(3)
        parts = []
        offset = 0
        for term in inner.split("+"):
            term = term.strip()
            if term.startswith("0x") or term.startswith("-0x"):
                offset += int(term, 16)
            elif term in ("RZ", "URZ"):
                continue
            else:
                k, i = _reg_index(term.split(".")[0])
                parts.append((k, i, 1))
        return Operand("c", bank=bank, offset=offset, parts=tuple(parts), neg=bool(m.group(1)), text=tok)
    m = re.match(r"^(?:desc\[(UR\d+)\])?\[(.+)\]$", tok)
    if m:
        parts = []
        offset = 0
        for term in m.group(2).split("+"):
            term = term.strip()
            if re.match(r"^-?0x[0-9a-f]+$", term):
                offset += int(term, 16)
                continue
            base = term.split(".")[0]
            if base in ("RZ", "URZ"):
                continue
            scale = 1
            sm = re.search(r"\.X(\d+)", term)
            if sm:
                scale = int(sm.group(1))
            k, i = _reg_index(base)
            parts.append((k, i, scale, ".64" in term))
        return Operand("mem", offset=offset, parts=tuple(parts), text=tok)
    m = _REG.match(tok)
    if m:
        k, i = _reg_index(m.group(5))
        half = ""
        hm = re.search(r"\.(H0|H1|B0|B1|B2|B3)(?:_H\d)?\b", tok)
        if hm:
            half = hm.group(1)
        return Operand(k, i, neg=bool(m.group(1) or m.group(4)), abs=bool(m.group(2)), inv=bool(m.group(3)),
                       half=half, text=tok)
    return Operand("imm", text=tok)


def split_operands(text: str) -> List[str]:
    """Operands of an instruction: commas outside brackets; a trailing backquoted target dropped."""
    text = re.sub(r"`\(.*?\)", "", text).strip()
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def imm_int(text: str) -> Optional[int]:
    try:
        return int(text, 0) & 0xFFFFFFFF
    except ValueError:
        return None


def imm_float_bits(text: str) -> Optional[int]:
    t = text.strip()
    if re.match(r"^-?0x[0-9a-f]+$", t):
        return int(t, 16) & 0xFFFFFFFF
    special = {"+INF": float("inf"), "INF": float("inf"), "-INF": float("-inf"), "+QNAN": float("nan"),
               "QNAN": float("nan"), "-QNAN": float("nan")}
    try:
        v = special[t] if t in special else float(t)
    except ValueError:
        return None
    return struct.unpack("<I", struct.pack("<f", v))[0]


# ---- results --------------------------------------------------------------------------------------------------
@dataclass
class Counts:
    """What one thread block issued: warp-instructions per instruction address, summed over its warps."""

    issued: Counter = field(default_factory=Counter)
    unknown_branches: Counter = field(default_factory=Counter)   # address -> times a branch decision was unknown
    unmodelled: Counter = field(default_factory=Counter)         # opcode -> times executed without semantics
    generic_global: Counter = field(default_factory=Counter)     # address -> issues of a generic LD/ST to global
    steps: int = 0

    def add(self, other: "Counts", weight: float = 1.0) -> None:
        for k, v in other.issued.items():
            self.issued[k] += v * weight
        for k, v in other.unknown_branches.items():
            self.unknown_branches[k] += v * weight
        for k, v in other.unmodelled.items():
            self.unmodelled[k] += v * weight
        for k, v in other.generic_global.items():
            self.generic_global[k] += v * weight
        self.steps += other.steps


class EmulationError(RuntimeError):
    pass


# ---- the machine ----------------------------------------------------------------------------------------------
class _Warps:
    """The block's warps, side by side: ``n`` = 32 x warps lanes of vector registers, one row of uniform
    registers per warp. They are emulated together (one numpy operation serves every warp at a program
    counter) but each warp keeps its own minimum-PC schedule, barrier state and uniform datapath."""

    def __init__(self, threads: int):
        self.warps = nw = max(1, -(-threads // W))
        self.n = n = W * nw
        # Registers start known (as 0): code that reads one before writing it only merges bit fields into it
        # (LOP3 clears then sets the flags it later tests), which this tracking, per register and not per
        # bit, could not follow from an unknown start; no compiled code decides on an unwritten value.
        self.R = np.zeros((NREG, n), np.uint32)
        self.RK = np.ones((NREG, n), bool)
        # The low 16 bits known (a superset of RK): PRMT merges a known half into a register whose other
        # half is unknown, and byte or half-word stores read only the low half.
        self.RK16 = np.ones((NREG, n), bool)
        self.P = np.zeros((8, n), bool)
        self.PK = np.zeros((8, n), bool)
        self.P[PT] = True
        self.PK[PT] = True
        self.UR = np.zeros((64, nw), np.uint32)
        self.URK = np.zeros((64, nw), bool)
        self.URK[URZ] = True
        self.UP = np.zeros((8, nw), bool)
        self.UPK = np.zeros((8, nw), bool)
        self.UP[PT] = True
        self.UPK[PT] = True
        self.pc = np.zeros(n, np.int64)
        self.tid = np.arange(n, dtype=np.int64)
        self.lane = self.tid % W
        self.done = self.tid >= threads
        self.waiting = np.zeros(n, bool)   # lanes of warps stopped at a CTA barrier
        self.local = None          # per-lane local memory (spills), allocated on first use
        self.local_known = None

    def per_warp(self, lanes: np.ndarray) -> np.ndarray:
        """[warps] bool: which warps have a lane in ``lanes``."""
        return lanes.reshape(self.warps, W).any(axis=1)

    def of_warps(self, flags: np.ndarray) -> np.ndarray:
        """[n] lanes of the warps flagged in ``flags`` [warps]."""
        return np.repeat(flags, W)


class _Block:
    def __init__(self, function: sass.Function, const0: bytes, threads: int, ctaid: Tuple[int, int, int],
                 nctaid: Tuple[int, int, int], shared_size: int, arch: int, max_steps: int,
                 banks: Optional[Dict[int, bytes]] = None):
        self.fn = function
        self.ins = function.instructions
        self.index = {ins.address: i for i, ins in enumerate(self.ins)}
        decoded = getattr(function, "_decoded", None)
        if decoded is None:  # parsed once per function, shared by every block emulated
            decoded = ([[parse_operand(t) for t in split_operands(ins.operands)] for ins in self.ins],
                       [parse_operand(ins.guard[1:]) if ins.guard else None for ins in self.ins],
                       [ins.base for ins in self.ins], [ins.address for ins in self.ins],
                       [ins.opcode.split(".")[1:] for ins in self.ins])
            function._decoded = decoded
        self.ops, self.guards, self.bases, self.addresses, self.mods = decoded
        self.const0 = bytearray(const0)
        self._const_cache: Dict[Tuple[int, int, int], Tuple[int, bool]] = {}
        self.banks = dict(banks or {})
        self.threads = threads
        self.ctaid = ctaid
        self.nctaid = nctaid
        self.arch = arch
        self.shared = np.zeros(shared_size + 64, np.uint8)
        self.shared_known = np.zeros(shared_size + 64, bool)
        self.counts = Counts()
        self.max_steps = max_steps
        self.warps = _Warps(threads)

    # -- values --
    def const(self, bank: int, offset: int, nbytes: int) -> Tuple[int, bool]:
        key = (bank, offset, nbytes)
        hit = self._const_cache.get(key)
        if hit is None:
            data = self.const0 if bank == 0 else self.banks.get(bank)
            if data is None or offset < 0 or offset + nbytes > len(data):
                hit = (0, False)
            else:
                hit = (int.from_bytes(data[offset:offset + nbytes], "little"), True)
            self._const_cache[key] = hit
        return hit

    def const_lanes(self, bank: int, offs: np.ndarray, sel: np.ndarray, nbytes: int, signed: bool = False):
        """The constant at each selected lane's offset: (values [n] uint64, ok [n]; 0 and True elsewhere),
        read once per distinct offset."""
        vals = np.zeros(len(offs), np.uint64)
        ok = np.ones(len(offs), bool)
        idx = np.nonzero(sel)[0]
        if len(idx):
            distinct, where = np.unique(offs[idx], return_inverse=True)
            read = [self.const(bank, int(o), nbytes) for o in distinct]
            bits = 8 * nbytes
            got = [(v - (1 << bits) if signed and v >> (bits - 1) else v) & 0xFFFFFFFFFFFFFFFF for v, _ in read]
            vals[idx] = np.array(got, np.uint64)[where]
            ok[idx] = np.array([g for _, g in read], bool)[where]
        return vals, ok


def _shared_bytes(shared: np.ndarray, addr: np.ndarray, sel: np.ndarray, nbytes: int):
    """Lanes of ``sel`` whose ``nbytes`` at ``addr`` (24 bits) lie in shared memory, and those byte indices
    [lanes, nbytes]."""
    idx = np.nonzero(sel)[0]
    a = addr[idx] & 0xFFFFFF
    inside = a + nbytes <= len(shared)
    idx, a = idx[inside], a[inside]
    return idx, a[:, None] + np.arange(nbytes)


def _uniform(w: _Warps, lanes: np.ndarray, v: np.ndarray):
    """For a write to a uniform register: (warps written [warps], each one's first written lane's value,
    v as [warps, 32], lanes as [warps, 32])."""
    sel = lanes.reshape(w.warps, W)
    v2 = v.reshape(w.warps, W)
    first = v2[np.arange(w.warps), sel.argmax(axis=1)]
    return sel.any(axis=1), first, v2, sel


def _u32(x) -> np.ndarray:
    return (np.asarray(x, dtype=np.uint64) & MASK32).astype(np.uint32)


def _f32(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.uint32).view(np.float32)


def _bits(f: np.ndarray) -> np.ndarray:
    return np.asarray(f, dtype=np.float32).view(np.uint32)


class Emulator:
    """Runs one thread block of a SASS function (see the module doc)."""

    def __init__(self, function: sass.Function, const0: bytes, threads: int, ctaid=(0, 0, 0), nctaid=(1, 1, 1),
                 shared_size: int = 0, arch: int = 90, max_steps: int = 50_000_000,
                 banks: Optional[Dict[int, bytes]] = None):
        self.b = _Block(function, const0, threads, tuple(ctaid), tuple(nctaid), shared_size, arch, max_steps, banks)

    # ---- operand access ----
    def rd(self, w: _Warps, op: Operand, lanes: np.ndarray, float_op: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """(uint32 values [w.n], known [w.n]) of a source operand."""
        if op.kind == "R":
            v = w.R[op.index].copy()
            k = w.RK[op.index].copy()
        elif op.kind == "UR":
            v = np.repeat(w.UR[op.index], W)
            k = np.repeat(w.URK[op.index], W)
        elif op.kind == "imm":
            bits = imm_float_bits(op.text) if float_op else imm_int(op.text)
            if bits is None:
                bits = imm_int(op.text) if float_op else imm_float_bits(op.text)
            if bits is None:
                return np.zeros(w.n, np.uint32), np.zeros(w.n, bool)
            v = np.full(w.n, bits, np.uint32)
            k = np.ones(w.n, bool)
        elif op.kind == "c":
            offs = np.full(w.n, op.offset, np.int64)
            k = np.ones(w.n, bool)
            for kind, idx, _ in op.parts:
                rv, rk = self.rd(w, Operand(kind, idx), lanes)
                offs = offs + rv.astype(np.int64)
                k &= rk
            vals, ok = self.b.const_lanes(op.bank, offs, lanes & k, 4)
            v = vals.astype(np.uint32)
            k &= ok
            if op.neg and k.any():
                v = _bits(-_f32(v)) if float_op else _u32(-v.astype(np.int64))
            return v, k
        elif op.kind == "SR":
            return self.special(w, op.text)
        elif op.kind in ("P", "UP"):
            p, pk = self.pred(w, op)
            return p.astype(np.uint32), pk
        else:
            return np.zeros(w.n, np.uint32), np.zeros(w.n, bool)
        if op.half:
            if op.half in ("H1",):
                v = v >> np.uint32(16)
            elif op.half == "H0":
                v = v & np.uint32(0xFFFF)
            elif op.half.startswith("B"):
                v = (v >> np.uint32(8 * int(op.half[1]))) & np.uint32(0xFF)
        if float_op:
            if op.abs:
                v = v & np.uint32(0x7FFFFFFF)
            if op.neg:
                v = v ^ np.uint32(0x80000000)
        else:
            if op.inv:
                v = ~v
            if op.neg:
                v = _u32(-(v.astype(np.int64)))
            if op.abs:
                v = _u32(np.abs(v.view(np.int32).astype(np.int64)))
        return v, k

    def rd64(self, w: _Warps, op: Operand, lanes) -> Tuple[np.ndarray, np.ndarray]:
        """A 64-bit pair operand (R and R+1, or UR and UR+1) as uint64."""
        if op.kind in ("R", "UR") and op.index not in (RZ, URZ):
            lo, lk = self.rd(w, Operand(op.kind, op.index), lanes)
            hi, hk = self.rd(w, Operand(op.kind, op.index + 1), lanes)
            v = lo.astype(np.uint64) | (hi.astype(np.uint64) << np.uint64(32))
            if op.neg:
                v = (np.uint64(0) - v)
            return v, lk & hk
        if op.kind == "c":
            offs = op.offset
            val, ok = self.b.const(op.bank, offs, 8)
            return np.full(w.n, val, np.uint64), np.full(w.n, ok, bool)
        lo, lk = self.rd(w, op, lanes)
        if op.kind == "imm":  # sign-extended 32-bit immediate
            return lo.view(np.int32).astype(np.int64).astype(np.uint64), lk
        return lo.astype(np.uint64), lk

    def pred(self, w: _Warps, op: Operand) -> Tuple[np.ndarray, np.ndarray]:
        if op.kind == "UP":
            v = np.repeat(w.UP[op.index], W)
            k = np.repeat(w.UPK[op.index], W)
        elif op.kind == "P":
            v = w.P[op.index].copy()
            k = w.PK[op.index].copy()
        else:
            return np.ones(w.n, bool), np.ones(w.n, bool)
        return (~v if op.inv else v), k

    def special(self, w: _Warps, name: str) -> Tuple[np.ndarray, np.ndarray]:
        b = self.b
        ones = np.ones(w.n, bool)
        if name == "SR_TID.X":
            return _u32(w.tid % max(b.threads, 1)), ones
        if name in ("SR_TID.Y", "SR_TID.Z"):
            return np.zeros(w.n, np.uint32), ones
        if name.startswith("SR_CTAID."):
            return np.full(w.n, b.ctaid["XYZ".index(name[-1])], np.uint32), ones
        if name.startswith("SR_NCTAID."):
            return np.full(w.n, b.nctaid["XYZ".index(name[-1])], np.uint32), ones
        if name == "SR_LANEID":
            return w.lane.astype(np.uint32), ones
        if name in ("SR_VIRTUALSMID", "SR_SMID", "SR_CgaCtaId", "SR_CLOCKLO", "SR_CLOCKHI", "SR_GLOBALTIMERLO",
                    "SR_GLOBALTIMERHI", "SR_WARPID", "SR_NSMID"):
            return np.zeros(w.n, np.uint32), np.zeros(w.n, bool) if "CLOCK" in name or "TIMER" in name else ones
        if name == "SR_SWINHI":  # high word of the shared window in generic addresses
            return np.full(w.n, SHARED_WINDOW_HI, np.uint32), ones
        if name in ("SR_LEMASK", "SR_LTMASK", "SR_GEMASK", "SR_GTMASK", "SR_LEMASK"):
            lane = w.lane.astype(np.uint64)
            full = np.uint64(0xFFFFFFFF)
            if name == "SR_LTMASK":
                return _u32((np.uint64(1) << lane) - np.uint64(1)), ones
            if name == "SR_LEMASK":
                return _u32((np.uint64(2) << lane) - np.uint64(1)), ones
            if name == "SR_GTMASK":
                return _u32(full ^ ((np.uint64(2) << lane) - np.uint64(1))), ones
            return _u32(full ^ ((np.uint64(1) << lane) - np.uint64(1))), ones
        return np.zeros(w.n, np.uint32), np.zeros(w.n, bool)

    # ---- writes ----
    def wr(self, w: _Warps, op: Operand, lanes: np.ndarray, v: np.ndarray, k: np.ndarray) -> None:
        if op.kind == "R":
            if op.index == RZ:
                return
            np.copyto(w.R[op.index], v, where=lanes, casting="unsafe")
            np.copyto(w.RK[op.index], k, where=lanes)
            np.copyto(w.RK16[op.index], k, where=lanes)
        elif op.kind == "UR":
            if op.index == URZ:
                return
            on, first, v2, sel = _uniform(w, lanes, v)
            if on.any():
                k2 = k.reshape(w.warps, W)
                known = (k2 | ~sel).all(axis=1) & ((v2 == first[:, None]) | ~sel).all(axis=1)
                w.UR[op.index][on] = first[on]
                w.URK[op.index][on] = known[on]
        elif op.kind == "P":
            if op.index == PT:
                return
            np.copyto(w.P[op.index], v.astype(bool), where=lanes)
            np.copyto(w.PK[op.index], k, where=lanes)
        elif op.kind == "UP":
            if op.index == PT:
                return
            on, first, _, sel = _uniform(w, lanes, v)
            if on.any():
                known = (k.reshape(w.warps, W) | ~sel).all(axis=1)
                w.UP[op.index][on] = first[on].astype(bool)
                w.UPK[op.index][on] = known[on]

    def wr64(self, w, op, lanes, v64, k):
        self.wr(w, Operand(op.kind, op.index), lanes, _u32(v64), k)
        if op.index not in (RZ, URZ):
            self.wr(w, Operand(op.kind, op.index + 1), lanes, _u32(v64 >> np.uint64(32)), k)

    def unknown(self, w, op, lanes, wide=1):
        if op.kind in ("R", "UR"):
            for i in range(wide):
                if op.index + i in (RZ, URZ) or (op.kind == "UR" and op.index + i >= 63) or op.index + i >= RZ:
                    continue
                self.wr(w, Operand(op.kind, op.index + i), lanes, np.zeros(w.n, np.uint32), np.zeros(w.n, bool))
        elif op.kind in ("P", "UP"):
            self.wr(w, op, lanes, np.zeros(w.n, np.uint32), np.zeros(w.n, bool))

    # ---- memory ----
    def address(self, w, op: Operand, lanes) -> Tuple[np.ndarray, np.ndarray]:
        addr = np.full(w.n, op.offset, np.int64)
        k = np.ones(w.n, bool)
        for kind, idx, scale, wide in op.parts:
            if wide:
                v, vk = self.rd64(w, Operand(kind, idx), lanes)
                v = v.astype(np.int64)
            else:
                v, vk = self.rd(w, Operand(kind, idx), lanes)
                v = v.astype(np.int64)
            addr = addr + v * scale
            k &= vk
        return addr, k

    def shared_load(self, w, op, lanes, nbytes, generic=False):
        addr, k = self.address(w, op, lanes)
        if generic:  # only the lanes whose generic address falls in the shared window read shared memory
            k = k & ((addr >> 32) == SHARED_WINDOW_HI)
            addr = addr & 0xFFFFFFFF
        words = max(1, nbytes // 4)
        vals = np.zeros((words, w.n), np.uint32)
        known = np.zeros((words, w.n), bool)
        idx, at = _shared_bytes(self.b.shared, addr, lanes & k, nbytes)
        if len(idx):
            chunk = self.b.shared[at].astype(np.uint32)              # [lanes, nbytes]
            if nbytes < 4:
                chunk = np.pad(chunk, ((0, 0), (0, 4 - nbytes)))
            chunk = chunk.reshape(len(idx), words, 4)
            vals[:, idx] = (chunk[..., 0] | chunk[..., 1] << 8 | chunk[..., 2] << 16 | chunk[..., 3] << 24).T
            known[:, idx] = self.b.shared_known[at].reshape(len(idx), words, -1).all(axis=2).T
        return vals, known

    def shared_store(self, w, op, lanes, data: List[Tuple[np.ndarray, np.ndarray]], nbytes, generic=False):
        addr, k = self.address(w, op, lanes)
        if generic:
            k = k & ((addr >> 32) == SHARED_WINDOW_HI)
            addr = addr & 0xFFFFFFFF
        idx, at = _shared_bytes(self.b.shared, addr, lanes & k, nbytes)
        if len(idx):
            words = np.stack([v[idx].astype(np.uint32) for v, _ in data], axis=1)      # [lanes, words]
            raw = words.astype("<u4").view(np.uint8).reshape(len(idx), -1)[:, :nbytes]
            known = np.logical_and.reduce([kk[idx] for _, kk in data])
            # In lane order, as the lanes' stores would land one after another (the last lane's byte stays).
            self.b.shared[at.ravel()] = raw.ravel()
            self.b.shared_known[at.ravel()] = np.repeat(known, nbytes)

    # ---- the loop ----
    def run(self) -> Counts:
        """Run the block to its end. At each step the instruction at the lowest program counter among the
        running lanes is issued for the lanes there: for every warp with a lane there it is that warp's own
        minimum-PC choice (no lane of it is lower), so each warp issues exactly the sequence it would alone,
        and the warps that share a program counter share one numpy operation. A warp that reaches a CTA
        barrier waits there until every warp that has not exited has reached one."""
        b = self.b
        w = b.warps
        counts = b.counts
        issued = counts.issued
        n_ins = len(b.ins)
        addresses = b.addresses
        guards = b.guards
        bases = b.bases
        pc_step = None  # (pc, lanes, warps) while every running lane is at one pc: no minimum to search
        while True:
            if pc_step is None:
                running = ~w.done & ~w.waiting
                if not running.any():
                    if w.done.all():
                        return counts
                    w.waiting[:] = False  # every warp still alive is at a barrier: all go on
                    continue
                running_pcs = w.pc[running]
                pc = int(running_pcs.min())
                lanes = running & (w.pc == pc)
                warps = int(w.per_warp(lanes).sum())
                if int(running_pcs.max()) == pc:
                    pc_step = (pc, lanes, warps)
            else:
                pc, lanes, warps = pc_step
            if pc >= n_ins:
                raise EmulationError(f"{b.fn.name}: ran off the end of the code")
            issued[addresses[pc]] += warps
            counts.steps += warps
            if counts.steps > b.max_steps:
                ins = b.ins[pc]
                raise EmulationError(f"{b.fn.name}: more than {b.max_steps} warp-instructions in one block "
                                     f"(at {ins.address:#x} {ins.text})")
            base = bases[pc]
            g = guards[pc]
            if g is None:
                execute = lanes
                unknown_guard = None
            else:
                guard, gk = self.pred(w, g)
                execute = lanes & guard
                unknown_guard = lanes & ~gk
                if not unknown_guard.any():
                    unknown_guard = None
            if base in _CONTROL:
                ins = b.ins[pc]
                if unknown_guard is not None:
                    take = self.avoid_slow_path(pc)
                    if take is None:
                        counts.unknown_branches[ins.address] += int(w.per_warp(unknown_guard).sum())
                        take = False  # an unknown decision: not taken
                    execute = (execute & ~unknown_guard) | (unknown_guard if take else np.zeros(w.n, bool))
                self.control(w, ins, pc, lanes, execute)
                pc_step = None
                if base == "BRA":
                    # Still converged when every running lane is now at one pc.
                    running = ~w.done & ~w.waiting
                    pcs = w.pc[running]
                    if len(pcs) and (pcs == pcs[0]).all():
                        pc_step = (int(pcs[0]), running, int(w.per_warp(running).sum()))
                continue
            if pc_step is not None:
                pc_step = (pc + 1, lanes, warps)
            w.pc[lanes] = pc + 1
            if unknown_guard is not None:
                # A predicated non-branch with an unknown guard: its destination becomes unknown there.
                self.execute(w, b.ins[pc], pc, unknown_guard, poison=True)
            if execute is lanes or execute.any():
                self.execute(w, b.ins[pc], pc, execute)
            if base == "BAR" and "ARV" not in b.ins[pc].opcode:
                # A CTA barrier: these warps wait until the others have run up to one.
                w.waiting |= w.of_warps(w.per_warp(lanes))
                pc_step = None

    def avoid_slow_path(self, pc: int) -> Optional[bool]:
        """For a branch on unknown data: True (take it) when the fall-through block calls a math library
        slow path (``__cuda_*_slowpath``: operands outside the fast path's range), False when the target
        block does, None when neither does (a data-dependent decision). A block ends at the next branch."""
        b = self.b
        ins = b.ins[pc]
        if ins.base != "BRA" or ins.target is None:
            return None

        def calls_slow(start: int, stop: int) -> bool:
            for i in range(start, min(start + 12, len(b.ins), stop)):
                x = b.ins[i]
                if x.base == "CALL" and "slowpath" in x.operands:
                    return True
                if x.base in ("BRA", "EXIT", "RET", "CALL"):  # the block ends at the next transfer
                    return False
            return False

        target = b.index[ins.target]
        if target > pc and calls_slow(pc + 1, target):  # the fall-through, up to where the paths meet
            return True
        if calls_slow(target, len(b.ins)):
            return False
        return None

    def control(self, w, ins, pc, lanes, execute):
        b = self.b
        base = ins.base
        w.pc[lanes] = pc + 1
        if not execute.any():
            return
        if base == "EXIT" or base == "KILL":
            w.done |= execute
            return
        if base == "BRA" or base == "JMP" or base == "BREAK":
            if base == "BREAK":
                return  # BREAK pops a convergence barrier: no control transfer by itself
            if "DIV" in ins.opcode.split(".")[1:]:
                # BRA.DIV: to the compiler's divergent-warp path only in warps with a live lane elsewhere.
                execute = execute & w.of_warps(w.per_warp(~w.done & ~execute))
                if not execute.any():
                    return
            if ins.target is None:
                raise EmulationError(f"{b.fn.name}: branch without a target at {ins.address:#x}")
            ops = b.ops[pc]
            if base == "BRA" and ops and ops[0].kind in ("P", "UP"):
                # `@Pg BRA Pc, target`: a second condition, taken where the guard and Pc both hold (ptxas
                # folds two loop-exit tests into one branch). An unknown Pc counts as not taken.
                cond, known = self.pred(w, ops[0])
                unknown = execute & ~known
                if unknown.any():
                    b.counts.unknown_branches[ins.address] += int(w.per_warp(unknown).sum())
                execute = execute & cond & known
                if not execute.any():
                    return
            w.pc[execute] = b.index[ins.target]
            return
        if base == "CALL":
            if ins.target is None or ins.target not in b.index:
                raise EmulationError(f"{b.fn.name}: call to an unknown target at {ins.address:#x}")
            w.pc[execute] = b.index[ins.target]
            return
        if base == "RET":
            ops = b.ops[pc]
            v, k = self.rd(w, ops[0], execute)
            for lane in np.nonzero(execute)[0]:
                if not k[lane] or int(v[lane]) not in b.index:
                    raise EmulationError(f"{b.fn.name}: return address unknown at {ins.address:#x}")
                w.pc[lane] = b.index[int(v[lane])]
            return
        raise EmulationError(f"{b.fn.name}: unsupported control instruction {ins.text}")

    # ---- semantics ----
    def execute(self, w: _Warps, ins: sass.Instruction, pc: int, lanes: np.ndarray, poison: bool = False) -> None:
        ops = self.b.ops[pc]
        base = self.b.bases[pc]
        mods = self.b.mods[pc]
        if poison:
            if base not in _NO_DEST:
                for o in ops[:2]:
                    if o.kind in ("R", "UR", "P", "UP"):
                        self.unknown(w, o, lanes, _poison_width(ins, o))
            return
        handler = _HANDLERS.get(base)
        if handler is None:
            self.b.counts.unmodelled[base] += int(w.per_warp(lanes).sum())
            if ops and ops[0].kind in ("R", "UR", "P", "UP") and base not in _NO_DEST:
                self.unknown(w, ops[0], lanes, _poison_width(ins, ops[0]))
                if len(ops) > 1 and ops[1].kind in ("P", "UP"):
                    self.unknown(w, ops[1], lanes)
            return
        handler(self, w, ins, ops, mods, lanes)


def _poison_width(ins: sass.Instruction, op: Operand) -> int:
    if op.kind not in ("R", "UR"):
        return 1
    if ins.base in ("LDS", "LD", "LDG", "LDL", "LDC", "ULDC"):
        return max(1, _size(ins.opcode.split(".")[1:]) // 4)
    if ".WIDE" in ins.opcode or ".64" in ins.opcode:
        return 2
    return dst_width(ins)


# ---- instruction handlers ---------------------------------------------------------------------------------------
_CONTROL = {"BRA", "CALL", "RET", "EXIT", "BREAK", "BRX", "JMP", "KILL"}
_NO_DEST = {"ST", "STS", "STG", "STL", "RED", "REDG", "BAR", "MEMBAR", "FENCE", "NOP", "BSSY", "BSYNC", "WARPSYNC",
            "DEPBAR", "LDGDEPBAR", "YIELD", "ERRBAR", "CCTL", "SYNCS", "ARRIVES", "UTMALDG", "UTMASTG", "WARPGROUP",
            "ELECT", "UBLKCP", "ACQBULK"}

_HANDLERS = {}


def handles(*names):
    def deco(fn):
        for n in names:
            _HANDLERS[n] = fn
        return fn
    return deco


@handles("NOP", "BSSY", "BSYNC", "WARPSYNC", "DEPBAR", "LDGDEPBAR", "YIELD", "MEMBAR", "FENCE", "ERRBAR", "CCTL",
         "BAR", "BMOV", "NANOSLEEP", "PREEXIT", "CGAERRBAR", "ACQBULK")
def _nop(e, w, ins, ops, mods, lanes):
    if ins.base == "BMOV" and ops and ops[0].kind == "R":
        e.unknown(w, ops[0], lanes)


@handles("MOV", "UMOV")
def _mov(e, w, ins, ops, mods, lanes):
    v, k = e.rd(w, ops[1], lanes)
    e.wr(w, ops[0], lanes, v, k)


@handles("S2R", "S2UR", "CS2R")
def _s2r(e, w, ins, ops, mods, lanes):
    if ins.base == "CS2R":
        if ops[1].text == "SRZ":
            e.wr(w, ops[0], lanes, np.zeros(w.n, np.uint32), np.ones(w.n, bool))
            if "32" not in mods:
                e.wr(w, Operand(ops[0].kind, ops[0].index + 1), lanes, np.zeros(w.n, np.uint32), np.ones(w.n, bool))
            return
        e.unknown(w, ops[0], lanes, 2)
        return
    v, k = e.special(w, ops[1].text)
    e.wr(w, ops[0], lanes, v, k)


@handles("R2UR")
def _r2ur(e, w, ins, ops, mods, lanes):
    v, k = e.rd(w, ops[-1], lanes)
    e.wr(w, ops[0], lanes, v, k)


@handles("LDC", "ULDC")
def _ldc(e, w, ins, ops, mods, lanes):
    src = ops[1]
    nbytes = 8 if "64" in mods else 1 if "U8" in mods or "S8" in mods else 2 if "U16" in mods or "S16" in mods else 4
    offs = np.full(w.n, src.offset, np.int64)
    k = np.ones(w.n, bool)
    for kind, idx, _ in src.parts:
        rv, rk = e.rd(w, Operand(kind, idx), lanes)
        offs = offs + rv.astype(np.int64)
        k &= rk
    sel = lanes & k
    vals, ok = e.b.const_lanes(src.bank, offs, sel, nbytes, signed="S8" in mods or "S16" in mods)
    ok &= sel
    lo = (vals & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (vals >> np.uint64(32)).astype(np.uint32)
    e.wr(w, ops[0], lanes, lo, ok)
    if nbytes == 8:
        e.wr(w, Operand(ops[0].kind, ops[0].index + 1), lanes, hi, ok)


def _preds_out(ops):
    """Leading predicate destinations of an instruction (e.g. IADD3 R, P0, P1, a, b, c)."""
    out = []
    for o in ops[1:]:
        if o.kind in ("P", "UP") and not o.inv:
            out.append(o)
        else:
            break
    return out


@handles("IADD3", "UIADD3")
def _iadd3(e, w, ins, ops, mods, lanes):
    # a + b + c in 34 bits: a negated operand -x is added as ~x plus 1 (two's complement, as the hardware
    # does), so carries out of subtractions are right; .X adds the carry-in predicates.
    pouts = _preds_out(ops)
    srcs = ops[1 + len(pouts):]
    total = np.zeros(w.n, np.int64)
    k = np.ones(w.n, bool)
    for o in srcs[:3]:
        raw = Operand(o.kind, o.index, inv=o.inv, text=o.text, offset=o.offset, parts=o.parts, bank=o.bank,
                      half=o.half)
        v, vk = e.rd(w, raw, lanes)
        if o.neg:
            total = total + (~v).astype(np.int64) + 1
        else:
            total = total + v.astype(np.int64)
        k &= vk
    if "X" in mods:
        for o in srcs[3:5]:
            pv, pk = e.pred(w, o)
            total = total + pv.astype(np.int64)
            k &= pk
    carry = total >> 32
    e.wr(w, ops[0], lanes, _u32(total), k)
    for i, p in enumerate(pouts[:2]):
        e.wr(w, p, lanes, (carry >= i + 1).astype(np.uint32), k)


@handles("IMAD", "UIMAD", "IMUL", "UIMUL")
def _imad(e, w, ins, ops, mods, lanes):
    pouts = _preds_out(ops)
    srcs = ops[1 + len(pouts):]
    signed = "U32" not in mods
    if "MOV" in mods:
        v, k = e.rd(w, srcs[2] if len(srcs) > 2 else srcs[-1], lanes)
        e.wr(w, ops[0], lanes, v, k)
        return
    (a, ak), (b_, bk) = e.rd(w, srcs[0], lanes), e.rd(w, srcs[1], lanes)
    k = ak & bk
    if "WIDE" in mods:
        c, ck = e.rd64(w, srcs[2], lanes) if len(srcs) > 2 else (np.zeros(w.n, np.uint64), np.ones(w.n, bool))
        if signed:
            prod = a.view(np.int32).astype(np.int64) * b_.view(np.int32).astype(np.int64)
            res = (prod.astype(np.uint64) + c) & np.uint64(0xFFFFFFFFFFFFFFFF)
        else:
            res = a.astype(np.uint64) * b_.astype(np.uint64) + c
        e.wr64(w, ops[0], lanes, res, k & ck)
        return
    if "HI" in mods:
        # High word of a * b plus a 64-bit addend (the register pair c:c+1), as the Newton steps of
        # nvcc's integer division use it (c = 0, c + 1 = r adds r in the high word).
        c64, ck = e.rd64(w, srcs[2], lanes) if len(srcs) > 2 else (np.zeros(w.n, np.uint64), np.ones(w.n, bool))
        if signed:
            prod = a.view(np.int32).astype(np.int64) * b_.view(np.int32).astype(np.int64)
            total = (prod.astype(np.uint64) + c64)
        else:
            total = a.astype(np.uint64) * b_.astype(np.uint64) + c64
        e.wr(w, ops[0], lanes, _u32(total >> np.uint64(32)), k & ck)
        return
    c, ck = e.rd(w, srcs[2], lanes) if len(srcs) > 2 else (np.zeros(w.n, np.uint32), np.ones(w.n, bool))
    res = a.astype(np.uint64) * b_.astype(np.uint64) + c.astype(np.uint64)
    if "X" in mods:
        for o in srcs[3:4]:
            pv, pk = e.pred(w, o)
            res = res + pv.astype(np.uint64)
            ck = ck & pk
    e.wr(w, ops[0], lanes, _u32(res), k & ck)
    for p in pouts:
        e.wr(w, p, lanes, ((res >> np.uint64(32)) & np.uint64(1)).astype(np.uint32), k & ck)


@handles("VIADD", "UVIADD")
def _viadd(e, w, ins, ops, mods, lanes):
    (a, ak), (b_, bk) = e.rd(w, ops[1], lanes), e.rd(w, ops[2], lanes)
    e.wr(w, ops[0], lanes, _u32(a.astype(np.int64) + b_.astype(np.int64)), ak & bk)


def _minmax(a, b_, signed, take_min):
    if signed:
        x, y = a.view(np.int32), b_.view(np.int32)
    else:
        x, y = a, b_
    r = np.minimum(x, y) if take_min else np.maximum(x, y)
    return r.view(np.uint32) if signed else r


@handles("VIMNMX", "IMNMX", "UIMNMX")
def _imnmx(e, w, ins, ops, mods, lanes):
    (a, ak), (b_, bk) = e.rd(w, ops[1], lanes), e.rd(w, ops[2], lanes)
    p, pk = e.pred(w, ops[3]) if len(ops) > 3 else (np.ones(w.n, bool), np.ones(w.n, bool))
    signed = "U32" not in ins.opcode
    mn = _minmax(a, b_, signed, True)
    mx = _minmax(a, b_, signed, False)
    e.wr(w, ops[0], lanes, np.where(p, mn, mx), ak & bk & pk)


@handles("VIADDMNMX")
def _viaddmnmx(e, w, ins, ops, mods, lanes):
    (a, ak), (b_, bk), (c, ck) = e.rd(w, ops[1], lanes), e.rd(w, ops[2], lanes), e.rd(w, ops[3], lanes)
    p, pk = e.pred(w, ops[4]) if len(ops) > 4 else (np.ones(w.n, bool), np.ones(w.n, bool))
    s = _u32(a.astype(np.int64) + b_.astype(np.int64))
    signed = "U32" not in ins.opcode
    e.wr(w, ops[0], lanes, np.where(p, _minmax(s, c, signed, True), _minmax(s, c, signed, False)), ak & bk & ck & pk)


@handles("IABS")
def _iabs(e, w, ins, ops, mods, lanes):
    a, ak = e.rd(w, ops[1], lanes)
    e.wr(w, ops[0], lanes, _u32(np.abs(a.view(np.int32).astype(np.int64))), ak)


def _lut(a, b_, c, lut):
    r = np.zeros(a.shape, np.uint32)
    for bit in range(8):
        if (lut >> bit) & 1:
            ta = a if bit & 4 else ~a
            tb = b_ if bit & 2 else ~b_
            tc = c if bit & 1 else ~c
            r |= ta & tb & tc
    return r


@handles("LOP3", "ULOP3")
def _lop3(e, w, ins, ops, mods, lanes):
    # LOP3.LUT [Pd,] Rd, a, b, c, lut, Pin  or  LOP3.LUT Rd, [Pd,] a, b, c, lut, Pin
    pdst = None
    if ops[0].kind in ("P", "UP"):
        pdst, rdst, srcs = ops[0], ops[1], ops[2:]
    elif ops[1].kind in ("P", "UP") and not ops[1].inv and len(ops) > 6:
        pdst, rdst, srcs = ops[1], ops[0], ops[2:]
    else:
        rdst, srcs = ops[0], ops[1:]
    (a, ak), (b_, bk), (c, ck) = (e.rd(w, o, lanes) for o in srcs[:3])
    lut = imm_int(srcs[3].text)
    r = _lut(a, b_, c, lut)
    k = ak & bk & ck
    if lut == 0xC0 and srcs[1].kind == "imm" and (imm_int(srcs[1].text) or 0) <= 0xFFFF and srcs[0].kind == "R":
        k = k | (w.RK16[srcs[0].index] & ck)  # a & mask16: only the low half of a matters
    e.wr(w, rdst, lanes, r, k)
    if pdst is not None:
        e.wr(w, pdst, lanes, (r != 0).astype(np.uint32), k)


@handles("LOP", "ULOP")
def _lop(e, w, ins, ops, mods, lanes):
    (a, ak), (b_, bk) = e.rd(w, ops[1], lanes), e.rd(w, ops[2], lanes)
    r = a & b_ if "AND" in mods else a | b_ if "OR" in mods else a ^ b_
    e.wr(w, ops[0], lanes, r, ak & bk)


@handles("PLOP3", "UPLOP3")
def _plop3(e, w, ins, ops, mods, lanes):
    dsts = ops[:2]
    srcs = ops[2:5]
    (a, ak), (b_, bk), (c, ck) = (e.pred(w, o) for o in srcs)
    lut1 = imm_int(ops[5].text)
    lut2 = imm_int(ops[6].text) if len(ops) > 6 else 0
    ua, ub, uc = a.astype(np.uint32), b_.astype(np.uint32), c.astype(np.uint32)
    r1 = _lut(ua * 0xFFFFFFFF, ub * 0xFFFFFFFF, uc * 0xFFFFFFFF, lut1) & 1
    r2 = _lut(ua * 0xFFFFFFFF, ub * 0xFFFFFFFF, uc * 0xFFFFFFFF, lut2) & 1
    k = ak & bk & ck
    e.wr(w, dsts[0], lanes, r1, k)
    e.wr(w, dsts[1], lanes, r2, k)


def _shift_pair(e, w, ops, lanes):
    (lo, lk), (s, sk), (hi, hk) = e.rd(w, ops[1], lanes), e.rd(w, ops[2], lanes), e.rd(w, ops[3], lanes)
    return lo, hi, s, lk & sk & hk


@handles("SHF", "USHF")
def _shf(e, w, ins, ops, mods, lanes):
    lo, hi, s, k = _shift_pair(e, w, ops, lanes)
    if "U64" in mods or "S64" in mods:
        mask = np.uint64(63)
    else:
        mask = np.uint64(31)
    s64 = s.astype(np.uint64) & mask
    if "S32" in mods or "S64" in mods:
        pair = (hi.view(np.int32).astype(np.int64) << 32) | lo.astype(np.int64)
    else:
        pair = ((hi.astype(np.uint64) << np.uint64(32)) | lo.astype(np.uint64)).astype(np.int64)
    if "L" in mods:
        res = (pair.astype(np.uint64) << s64)
        out = res >> np.uint64(32) if "HI" in mods else res
        e.wr(w, ops[0], lanes, _u32(out), k)
    else:
        if "S32" in mods or "S64" in mods:
            res = (pair >> s64.astype(np.int64)).astype(np.uint64)
        else:
            res = pair.astype(np.uint64) >> s64
        out = res >> np.uint64(32) if "HI" in mods else res
        e.wr(w, ops[0], lanes, _u32(out), k)


@handles("SHL", "SHR", "USHL", "USHR")
def _shl(e, w, ins, ops, mods, lanes):
    (a, ak), (s, sk) = e.rd(w, ops[1], lanes), e.rd(w, ops[2], lanes)
    s = s & np.uint32(31)
    if ins.base.endswith("SHL"):
        r = a << s
    elif "U32" in mods:
        r = a >> s
    else:
        r = (a.view(np.int32) >> s.astype(np.int32)).view(np.uint32)
    e.wr(w, ops[0], lanes, r, ak & sk)


@handles("LEA", "ULEA")
def _lea(e, w, ins, ops, mods, lanes):
    pouts = _preds_out(ops)
    srcs = ops[1 + len(pouts):]
    (a, ak), (b_, bk) = e.rd(w, srcs[0], lanes), e.rd(w, srcs[1], lanes)
    if "HI" in mods:
        if "SX32" in mods:
            c = (a.view(np.int32) >> 31).view(np.uint32)
            ck = ak
            sh = imm_int(srcs[2].text)
            rest = srcs[3:]
        else:
            c, ck = e.rd(w, srcs[2], lanes)
            sh = imm_int(srcs[3].text)
            rest = srcs[4:]
        pair = (c.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
        shifted = (pair << np.uint64(sh)) >> np.uint64(32)
        total = shifted.astype(np.uint64) + b_.astype(np.uint64)
        k = ak & bk & ck
        if "X" in mods:
            for o in rest[:1]:
                pv, pk = e.pred(w, o)
                total = total + pv.astype(np.uint64)
                k &= pk
        e.wr(w, ops[0], lanes, _u32(total), k)
        for p in pouts:
            e.wr(w, p, lanes, ((total >> np.uint64(32)) & np.uint64(1)).astype(np.uint32), k)
        return
    sh = imm_int(srcs[2].text)
    total = ((a.astype(np.uint64) << np.uint64(sh)) & np.uint64(0xFFFFFFFF)) + b_.astype(np.uint64)
    k = ak & bk
    if "X" in mods:
        for o in srcs[3:4]:
            pv, pk = e.pred(w, o)
            total = total + pv.astype(np.uint64)
            k &= pk
    e.wr(w, ops[0], lanes, _u32(total), k)
    for p in pouts:
        e.wr(w, p, lanes, ((total >> np.uint64(32)) & np.uint64(1)).astype(np.uint32), k)


_CMP = {"LT": np.less, "LE": np.less_equal, "GT": np.greater, "GE": np.greater_equal, "EQ": np.equal,
        "NE": np.not_equal}


def _combine(r, p, how):
    if how == "AND":
        return r & p
    if how == "OR":
        return r | p
    return r ^ p


def _combine_known(rk, p, pk, how):
    """Lanes where ``_combine(r, p, how)`` is known: both operands known, or the known predicate decides it
    alone (true OR anything; false AND anything), as when a compare on data is OR-ed with "no dropout"."""
    if how == "OR":
        return (rk & pk) | (pk & p)
    if how == "AND":
        return (rk & pk) | (pk & ~p)
    return rk & pk


@handles("ISETP", "UISETP")
def _isetp(e, w, ins, ops, mods, lanes):
    cmp = next(m for m in mods if m in _CMP)
    how = next((m for m in mods if m in ("AND", "OR", "XOR")), "AND")
    unsigned = "U32" in mods
    (a, ak), (b_, bk) = e.rd(w, ops[2], lanes), e.rd(w, ops[3], lanes)
    p, pk = e.pred(w, ops[4]) if len(ops) > 4 else (np.ones(w.n, bool), np.ones(w.n, bool))
    x = a if unsigned else a.view(np.int32)
    y = b_ if unsigned else b_.view(np.int32)
    if "EX" in mods:
        lowp, lk = e.pred(w, ops[5]) if len(ops) > 5 else (np.ones(w.n, bool), np.ones(w.n, bool))
        eq = x == y
        if cmp in ("LT", "LE", "GT", "GE"):
            strict = _CMP[cmp.replace("E", "T") if cmp in ("LE", "GE") else cmp](x, y)
            r = strict | (eq & lowp)
        elif cmp == "EQ":
            r = eq & lowp
        else:
            r = ~eq | lowp
        k = ak & bk & pk & lk
    else:
        r = _CMP[cmp](x, y)
        k = _combine_known(ak & bk, p, pk, how)
    e.wr(w, ops[0], lanes, _combine(r, p, how).astype(np.uint32), k)
    e.wr(w, ops[1], lanes, _combine(~r, p, how).astype(np.uint32), k)


@handles("FSETP", "FSET")
def _fsetp(e, w, ins, ops, mods, lanes):
    cmp = next((m for m in mods if m.rstrip("U") in _CMP or m in ("NAN", "NUM")), "EQ")
    how = next((m for m in mods if m in ("AND", "OR", "XOR")), "AND")
    (a, ak), (b_, bk) = e.rd(w, ops[2], lanes, True), e.rd(w, ops[3], lanes, True)
    p, pk = e.pred(w, ops[4]) if len(ops) > 4 else (np.ones(w.n, bool), np.ones(w.n, bool))
    x, y = _f32(a), _f32(b_)
    with np.errstate(invalid="ignore"):
        if cmp == "NAN":
            r = np.isnan(x) | np.isnan(y)
        elif cmp == "NUM":
            r = ~(np.isnan(x) | np.isnan(y))
        else:
            base = cmp.rstrip("U") if cmp not in ("NE",) else cmp
            if cmp == "NEU":
                base = "NE"
            r = _CMP[base](x, y)
            unordered = np.isnan(x) | np.isnan(y)
            r = (r | unordered) if cmp.endswith("U") else (r & ~unordered)
    k = _combine_known(ak & bk, p, pk, how)
    e.wr(w, ops[0], lanes, _combine(r, p, how).astype(np.uint32), k)
    if ops[1].kind == "P":
        e.wr(w, ops[1], lanes, _combine(~r, p, how).astype(np.uint32), k)


def _imm_double(text: str) -> Optional[float]:
    """A float64 comparison's immediate (a decimal or a special value; DSETP's hex immediates are the high half
    of the double, which is not read here: None)."""
    t = text.strip()
    special = {"+INF": float("inf"), "INF": float("inf"), "-INF": float("-inf")}
    if t in special:
        return special[t]
    try:
        return float(t) if not t.lower().startswith(("0x", "-0x")) else None
    except ValueError:
        return None


@handles("DSETP")
def _dsetp(e, w, ins, ops, mods, lanes):
    """Compare two float64 operands (register pairs, constants or a decimal immediate), as FSETP does float32:
    known where both are (the fold's tests on float64 parameters, e.g. center_keys > 0)."""
    cmp = next((m for m in mods if m.rstrip("U") in _CMP or m in ("NAN", "NUM")), "EQ")
    how = next((m for m in mods if m in ("AND", "OR", "XOR")), "AND")
    values = []
    for op in ops[2:4]:
        if op.kind == "imm":
            x = _imm_double(op.text)
            if x is None:
                _data(e, w, ins, ops, mods, lanes)
                return
            values.append((np.full(w.n, x), np.ones(w.n, bool)))
            continue
        raw, known = e.rd64(w, Operand(op.kind, op.index, text=op.text, offset=op.offset, parts=op.parts,
                                       bank=op.bank), lanes)
        x = raw.view(np.float64).copy()
        if op.abs:
            x = np.abs(x)
        if op.neg:
            x = -x
        values.append((x, known))
    (x, xk), (y, yk) = values
    p, pk = e.pred(w, ops[4]) if len(ops) > 4 else (np.ones(w.n, bool), np.ones(w.n, bool))
    with np.errstate(invalid="ignore"):
        unordered = np.isnan(x) | np.isnan(y)
        if cmp == "NAN":
            r = unordered
        elif cmp == "NUM":
            r = ~unordered
        else:
            base = "NE" if cmp == "NEU" else cmp.rstrip("U")
            r = _CMP[base](x, y)
            r = (r | unordered) if cmp.endswith("U") else (r & ~unordered)
    k = _combine_known(xk & yk, p, pk, how)
    e.wr(w, ops[0], lanes, _combine(r, p, how).astype(np.uint32), k)
    if ops[1].kind == "P":
        e.wr(w, ops[1], lanes, _combine(~r, p, how).astype(np.uint32), k)


@handles("FCHK")
def _fchk(e, w, ins, ops, mods, lanes):
    # Does this division need the slow path? Assumed not (the fast path covers every normal operand).
    e.wr(w, ops[0], lanes, np.zeros(w.n, np.uint32), np.ones(w.n, bool))


@handles("SEL", "USEL", "FSEL")
def _sel(e, w, ins, ops, mods, lanes):
    (a, ak), (b_, bk) = e.rd(w, ops[1], lanes, ins.base == "FSEL"), e.rd(w, ops[2], lanes, ins.base == "FSEL")
    p, pk = e.pred(w, ops[3])
    v = np.where(p, a, b_)
    k = pk & np.where(p, ak, bk)
    e.wr(w, ops[0], lanes, v, k)


@handles("P2R", "UP2UR")
def _p2r(e, w, ins, ops, mods, lanes):
    # P2R R, PR, R_src, mask: bits of the predicate file under the mask, ORed into R_src's other bits.
    mask = imm_int(ops[-1].text) or 0
    src, sk = e.rd(w, ops[2], lanes) if len(ops) > 3 else (np.zeros(w.n, np.uint32), np.ones(w.n, bool))
    bits = np.zeros(w.n, np.uint32)
    k = sk.copy()
    for i in range(7):
        if (mask >> i) & 1:
            bits |= (w.P[i].astype(np.uint32) << np.uint32(i))
            k &= w.PK[i]
    e.wr(w, ops[0], lanes, (src & ~np.uint32(mask)) | (bits & np.uint32(mask)), k)


@handles("R2P")
def _r2p(e, w, ins, ops, mods, lanes):
    v, k = e.rd(w, ops[1], lanes)
    mask = imm_int(ops[-1].text) or 0
    for i in range(7):
        if (mask >> i) & 1:
            e.wr(w, Operand("P", i), lanes, ((v >> np.uint32(i)) & np.uint32(1)), k)


@handles("PRMT", "UPRMT")
def _prmt(e, w, ins, ops, mods, lanes):
    (a, ak), (sel, sk), (b_, bk) = e.rd(w, ops[1], lanes), e.rd(w, ops[2], lanes), e.rd(w, ops[3], lanes)
    low = [ops[i].kind == "R" and w.RK16[ops[i].index] if ops[i].kind == "R" else k_ for i, k_ in ((1, ak), (3, bk))]
    src = (b_.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros(w.n, np.uint64)
    byte_known = []
    for i in range(4):
        nib = (sel.astype(np.uint64) >> np.uint64(4 * i)) & np.uint64(0xF)
        byte = (src >> ((nib & np.uint64(7)) * np.uint64(8))) & np.uint64(0xFF)
        sign = (byte >> np.uint64(7)) * np.uint64(0xFF)
        byte = np.where(nib & np.uint64(8), sign, byte)
        out |= byte << np.uint64(8 * i)
        j = (nib & np.uint64(7)).astype(np.int64)
        from_a = j < 4
        within = np.where(from_a, j, j - 4)
        known = np.where(from_a, np.where(within < 2, low[0], ak), np.where(within < 2, low[1], bk))
        byte_known.append(known & sk)
    k_all = byte_known[0] & byte_known[1] & byte_known[2] & byte_known[3]
    e.wr(w, ops[0], lanes, _u32(out), k_all)
    if ops[0].kind == "R" and ops[0].index != RZ:
        np.copyto(w.RK16[ops[0].index], byte_known[0] & byte_known[1], where=lanes)


@handles("SGXT", "USGXT")
def _sgxt(e, w, ins, ops, mods, lanes):
    (a, ak), (n, nk) = e.rd(w, ops[1], lanes), e.rd(w, ops[2], lanes)
    n = n.astype(np.int64).clip(1, 32)
    mask = (np.int64(1) << n) - 1
    v = a.astype(np.int64) & mask
    if "U32" not in mods:
        sign = (v >> (n - 1)) & 1
        v = np.where(sign == 1, v - (np.int64(1) << n), v)
    e.wr(w, ops[0], lanes, _u32(v), ak & nk)


@handles("BMSK", "UBMSK")
def _bmsk(e, w, ins, ops, mods, lanes):
    (a, ak), (n, nk) = e.rd(w, ops[1], lanes), e.rd(w, ops[2], lanes)
    mask = ((np.uint64(1) << n.astype(np.uint64)) - np.uint64(1)) << a.astype(np.uint64)
    e.wr(w, ops[0], lanes, _u32(mask), ak & nk)


@handles("POPC", "UPOPC", "FLO", "UFLO", "BREV", "UBREV")
def _bitops(e, w, ins, ops, mods, lanes):
    a, ak = e.rd(w, ops[-1], lanes)
    if ins.base.endswith("POPC"):
        r = np.array([bin(int(x)).count("1") for x in a], np.uint32)
    elif ins.base.endswith("BREV"):
        r = np.array([int(f"{int(x):032b}"[::-1], 2) for x in a], np.uint32)
    else:
        r = np.array([(int(x).bit_length() - 1) if x else 0xFFFFFFFF for x in a], np.uint32)
    e.wr(w, ops[0], lanes, r, ak)


@handles("VOTE", "VOTEU")
def _vote(e, w, ins, ops, mods, lanes):
    # Per warp, over its lanes here.
    pv, pk = e.pred(w, ops[-1])
    sel = lanes.reshape(w.warps, W)
    votes = pv.reshape(w.warps, W) & sel
    known = w.of_warps((pk.reshape(w.warps, W) | ~sel).all(axis=1))
    if ops[0].kind in ("R", "UR"):
        ballot = (votes.astype(np.uint64) << np.arange(W, dtype=np.uint64)).sum(axis=1)
        e.wr(w, ops[0], lanes, w.of_warps(ballot.astype(np.uint32)), known)
        rest = ops[1:-1]
    else:
        rest = ops[:-1]
    for o in rest:
        if o.kind in ("P", "UP"):
            val = votes.any(axis=1) if "ANY" in mods else (votes | ~sel).all(axis=1)
            e.wr(w, o, lanes, w.of_warps(val.astype(np.uint32)), known)


# -- floating point (known values only matter for integer division and parameters) --
def _fbin(e, w, ins, ops, lanes, fn):
    (a, ak), (b_, bk) = e.rd(w, ops[1], lanes, True), e.rd(w, ops[2], lanes, True)
    with np.errstate(all="ignore"):
        r = fn(_f32(a), _f32(b_))
    e.wr(w, ops[0], lanes, _bits(r), ak & bk)


@handles("FADD")
def _fadd(e, w, ins, ops, mods, lanes):
    _fbin(e, w, ins, ops, lanes, lambda x, y: x + y)


@handles("FMUL")
def _fmul(e, w, ins, ops, mods, lanes):
    _fbin(e, w, ins, ops, lanes, lambda x, y: x * y)


@handles("FMNMX")
def _fmnmx(e, w, ins, ops, mods, lanes):
    (a, ak), (b_, bk) = e.rd(w, ops[1], lanes, True), e.rd(w, ops[2], lanes, True)
    p, pk = e.pred(w, ops[3])
    x, y = _f32(a), _f32(b_)
    e.wr(w, ops[0], lanes, _bits(np.where(p, np.fmin(x, y), np.fmax(x, y))), ak & bk & pk)


@handles("FFMA")
def _ffma(e, w, ins, ops, mods, lanes):
    (a, ak), (b_, bk), (c, ck) = (e.rd(w, o, lanes, True) for o in ops[1:4])
    with np.errstate(all="ignore"):
        r = (_f32(a).astype(np.float64) * _f32(b_).astype(np.float64) + _f32(c).astype(np.float64))
        if "RP" in mods or "RM" in mods or "RZ" in mods:
            r32 = r.astype(np.float32)
            if "RP" in mods:
                r32 = np.where(r32.astype(np.float64) < r, np.nextafter(r32, np.float32(np.inf)), r32)
            elif "RM" in mods:
                r32 = np.where(r32.astype(np.float64) > r, np.nextafter(r32, np.float32(-np.inf)), r32)
            else:
                r32 = np.where(np.abs(r32.astype(np.float64)) > np.abs(r),
                               np.nextafter(r32, np.float32(0)), r32)
        else:
            r32 = r.astype(np.float32)
        if "SAT" in mods:
            r32 = np.clip(r32, 0, 1)
    e.wr(w, ops[0], lanes, _bits(r32), ak & bk & ck)


@handles("MUFU")
def _mufu(e, w, ins, ops, mods, lanes):
    a, ak = e.rd(w, ops[1], lanes, True)
    x = _f32(a)
    fn = mods[0]
    with np.errstate(all="ignore"):
        r = {"RCP": lambda v: np.float32(1) / v, "EX2": np.exp2, "LG2": np.log2, "RSQ": lambda v: 1 / np.sqrt(v),
             "SQRT": np.sqrt, "SIN": np.sin, "COS": np.cos, "TANH": np.tanh, "RCP64H": None,
             "RSQ64H": None}.get(fn)
        if r is None:
            e.unknown(w, ops[0], lanes)
            return
        e.wr(w, ops[0], lanes, _bits(r(x).astype(np.float32)), ak)


@handles("I2F", "I2FP", "UI2F", "UI2FP")
def _i2f(e, w, ins, ops, mods, lanes):
    a, ak = e.rd(w, ops[-1], lanes)
    if "F64" in mods:
        e.unknown(w, ops[0], lanes, 2)
        return
    if "U64" in mods or "S64" in mods:
        e.unknown(w, ops[0], lanes)
        return
    unsigned = "U32" in mods or ("S32" not in mods and ins.base.endswith("I2F") and "U32" in ins.opcode)
    exact = a.astype(np.float64) if unsigned else a.view(np.int32).astype(np.float64)
    f = exact.astype(np.float32)
    if "RP" in mods:
        f = np.where(f.astype(np.float64) < exact, np.nextafter(f, np.float32(np.inf)), f)
    e.wr(w, ops[0], lanes, _bits(f), ak)


@handles("F2I", "F2IP")
def _f2i(e, w, ins, ops, mods, lanes):
    a, ak = e.rd(w, ops[-1], lanes, True)
    if "F64" in mods or "U64" in mods or "S64" in mods or "F64" in ins.operands:
        e.unknown(w, ops[0], lanes, 2)
        return
    x = _f32(a).astype(np.float64)
    with np.errstate(all="ignore"):
        if "FLOOR" in mods:
            x = np.floor(x)
        elif "CEIL" in mods:
            x = np.ceil(x)
        elif "TRUNC" in mods or True:
            x = np.trunc(x)
        x = np.nan_to_num(x)
        if "U32" in mods:
            r = np.clip(x, 0, 0xFFFFFFFF).astype(np.uint64)
        else:
            r = np.clip(x, -2 ** 31, 2 ** 31 - 1).astype(np.int64)
    e.wr(w, ops[0], lanes, _u32(r), ak)


def dst_width(ins: sass.Instruction) -> int:
    """32-bit registers the first destination of a data instruction occupies."""
    base, mods = ins.base, ins.opcode.split(".")[1:]
    if base in ("F2F", "F2I", "I2F", "I2FP", "F2IP", "FRND", "I2I"):
        types = [m for m in mods if re.match(r"^(F|S|U)(8|16|32|64)$", m)]
        return 2 if types and types[0].endswith("64") else 1
    if base in ("DADD", "DMUL", "DFMA", "DMNMX"):
        return 2
    if base in ("HMMA", "IMMA", "BMMA"):
        return 4 if ".F32" in ins.opcode or ".S32" in ins.opcode else 2
    if base == "DMMA":
        return 4
    if base in ("HGMMA", "IGMMA", "QGMMA"):
        m = re.search(r"\.64x(\d+)x", ins.opcode)
        return max(1, int(m.group(1)) // 2) if m else 64
    if base == "LDSM":
        m = re.search(r"\.(\d)$", ins.opcode)
        return int(m.group(1)) if m else 1
    return 1


@handles("F2F", "F2FP", "FRND", "HADD2", "HFMA2", "HMUL2", "HMNMX2", "HSETP2", "DADD", "DMUL", "DFMA",
         "DMNMX", "FSWZADD", "I2I", "F2F64", "MOVM", "HMMA", "HGMMA", "DMMA", "IMMA", "BMMA", "LDSM", "SHFL")
def _data(e, w, ins, ops, mods, lanes):
    """Floating-point data and tensor-core results: unknown (they never steer the loops modelled here), except
    ptxas's way of setting a register to a constant on the FMA pipe, ``HFMA2.MMA Rd, -RZ, RZ, hi, lo``: 0 x 0
    plus the fp16 pair (hi, lo) is that pair's bits, which integer code reads (``0, 0`` is 0 and ``0,
    5.96e-08`` is 1: a loop counter's or a division's start; ``1.875, 0`` is 1.0f)."""
    if ins.base == "SHFL":
        _shfl(e, w, ins, ops, mods, lanes)
        return
    if ins.base == "HFMA2" and len(ops) == 5 and all(o.kind == "R" and o.index == RZ for o in ops[1:3]):
        halves = [_fp16_bits(o.text) if o.kind == "imm" else None for o in ops[3:5]]
        if None not in halves:
            e.wr(w, ops[0], lanes, np.full(w.n, (halves[0] << 16) | halves[1], np.uint32), np.ones(w.n, bool))
            return
    for o in ops[:1]:
        if o.kind in ("R", "UR", "P", "UP"):
            e.unknown(w, o, lanes, dst_width(ins) if o.kind in ("R", "UR") else 1)
    if ins.base in ("HSETP2", "DSETP") and len(ops) > 1 and ops[1].kind == "P":  # DSETP: an operand it cannot read
        e.unknown(w, ops[1], lanes)


def _fp16_bits(text: str) -> Optional[int]:
    """The fp16 bits of an immediate as nvdisasm prints one half of a pair (a decimal that fp16 holds exactly)."""
    try:
        value = float(text)
    except ValueError:
        return None
    half = np.float16(value)
    if float(half) != value and not np.isnan(value):
        return None
    return int(half.view(np.uint16))


def _shfl(e, w, ins, ops, mods, lanes):
    # SHFL.mode Pout, Rd, Ra, b (lane or delta), c (clamp/mask)
    pouts = [o for o in ops[:1] if o.kind == "P"]
    rest = ops[len(pouts):]
    dst, src = rest[0], rest[1]
    v, k = e.rd(w, src, lanes)
    bval, bk = e.rd(w, rest[2], lanes)
    lane = w.lane
    b_ = bval.astype(np.int64)
    if "IDX" in mods:
        srcl = b_ & 31
    elif "BFLY" in mods:
        srcl = lane ^ (b_ & 31)
    elif "UP" in mods:
        srcl = lane - b_
    else:
        srcl = lane + b_
    valid = (srcl >= 0) & (srcl < W)
    srcl = np.where(valid, srcl, lane) + (w.tid - lane)  # the source lane within the same warp
    out = v[srcl]
    ok = k[srcl] & bk & lanes[srcl]
    e.wr(w, dst, lanes, out, ok)
    for p in pouts:
        e.wr(w, p, lanes, valid.astype(np.uint32), bk)


_SIZE = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def _size(mods):
    for m in mods:
        if m in _SIZE:
            return _SIZE[m]
    return 4


def _generic_space(e, w, ins, ops, lanes) -> None:
    """Count a generic-address access that goes to global memory (its address is outside the shared window)."""
    mem = next((o for o in ops if o.kind == "mem"), None)
    if mem is None:
        return
    addr, k = e.address(w, mem, lanes)
    sel = (lanes & k).reshape(w.warps, W)
    outside = (((addr >> 32) != SHARED_WINDOW_HI).reshape(w.warps, W) & sel).sum(axis=1)
    known = sel.sum(axis=1)
    warps = int(((known > 0) & (outside * 2 >= known)).sum())  # per warp: most of its known lanes go to global
    if warps:
        e.b.counts.generic_global[ins.address] += warps


SHARED_WINDOW_HI = 1  # what SR_SWINHI reads here: generic addresses of shared memory are 0x1_xxxxxxxx
STACK_TOP = 0xFFFC00  # the local stack pointer the constant bank gives (c[0x0][0x28])
LOCAL_SPAN = 1 << 16  # bytes of local memory per lane below STACK_TOP that are modelled


def _local_index(w, addr):
    if w.local is None:
        w.local = np.zeros((w.n, LOCAL_SPAN), np.uint8)
        w.local_known = np.zeros((w.n, LOCAL_SPAN), bool)
    return (addr & 0xFFFFFF) - (STACK_TOP - LOCAL_SPAN)


def _local_load(e, w, ins, ops, mods, lanes):
    size = _size(mods)
    mem = next(o for o in ops if o.kind == "mem")
    addr, k = e.address(w, mem, lanes)
    words = max(1, size // 4)
    vals = np.zeros((words, w.n), np.uint32)
    known = np.zeros((words, w.n), bool)
    for lane in np.nonzero(lanes & k)[0]:
        a = int(_local_index(w, int(addr[lane])))
        if 0 <= a and a + size <= LOCAL_SPAN:
            raw = bytes(w.local[lane, a:a + size]) + b"\0" * 4
            kn = w.local_known[lane, a:a + size]
            for i in range(words):
                vals[i, lane] = int.from_bytes(raw[4 * i:4 * i + 4], "little") & ((1 << (8 * min(size, 4))) - 1)
                known[i, lane] = bool(kn[4 * i:4 * i + min(size, 4)].all())
    for i in range(words):
        e.wr(w, Operand("R", ops[0].index + i), lanes, vals[i], known[i])


def _local_store(e, w, ins, ops, mods, lanes):
    size = _size(mods)
    mem, src = ops[0], ops[1]
    addr, k = e.address(w, mem, lanes)
    words = max(1, size // 4)
    data = [e.rd(w, Operand(src.kind, src.index + i) if src.kind == "R" and src.index != RZ else src, lanes)
            for i in range(words)]
    for lane in np.nonzero(lanes & k)[0]:
        a = int(_local_index(w, int(addr[lane])))
        if 0 <= a and a + size <= LOCAL_SPAN:
            raw = b"".join(int(v[lane]).to_bytes(4, "little") for v, _ in data)[:size]
            w.local[lane, a:a + size] = np.frombuffer(raw, np.uint8)
            w.local_known[lane, a:a + size] = all(bool(kk[lane]) for _, kk in data)


@handles("LDS", "LD", "LDG", "LDL", "ATOMS", "ATOMG", "ATOM", "LDGSTS", "LDC64")
def _load(e, w, ins, ops, mods, lanes):
    size = _size(mods)
    dst = ops[0]
    if ins.base in ("LD", "ATOM"):
        _generic_space(e, w, ins, ops, lanes)
    if ins.base == "LDL":
        _local_load(e, w, ins, ops, mods, lanes)
        return
    if ins.base == "LDGSTS":
        return  # copies global -> shared: shared contents become unknown
    if ins.base in ("LDS", "LD") and dst.kind == "R":
        mem = next((o for o in ops if o.kind == "mem"), None)
        vals, known = e.shared_load(w, mem, lanes, size, generic=ins.base == "LD")
        if size < 4:
            vals = vals & np.uint32((1 << (8 * size)) - 1)
            if "S8" in mods or "S16" in mods:
                bits = 8 * size
                vals = _u32(np.where(vals >> np.uint32(bits - 1), vals.astype(np.int64) - (1 << bits), vals))
        for i in range(vals.shape[0]):
            e.wr(w, Operand("R", dst.index + i), lanes, vals[i], known[i])
        return
    if dst.kind in ("R", "UR", "P"):
        e.unknown(w, dst, lanes, max(1, size // 4))


@handles("STS", "ST", "STG", "STL", "RED", "REDG", "REDAS", "STSM")
def _store(e, w, ins, ops, mods, lanes):
    if ins.base in ("ST", "RED"):
        _generic_space(e, w, ins, ops, lanes)
    if ins.base == "STL":
        _local_store(e, w, ins, ops, mods, lanes)
        return
    if ins.base not in ("STS", "ST"):
        return
    size = _size(mods)
    mem = ops[0]
    src = ops[1]
    words = max(1, size // 4)
    data = [e.rd(w, Operand(src.kind, src.index + i) if src.kind in ("R", "UR") and src.index not in (RZ, URZ)
                 else src, lanes) for i in range(words)]
    if size <= 2 and src.kind == "R":  # only the low half is stored
        data = [(data[0][0], w.RK16[src.index].copy())]
    e.shared_store(w, mem, lanes, data, size, generic=ins.base == "ST")


PARAM_OFFSET = {90: 0x210, 80: 0x160, 86: 0x160, 89: 0x160}  # where kernel parameters start in constant bank 0


def constant_bank(params: bytes, arch: int, threads: int, grid: Sequence[int]) -> bytes:
    """Constant bank 0 as a launch sets it: block and grid sizes, the stack pointer, the kernel parameters."""
    offset = PARAM_OFFSET[arch]
    bank = bytearray(offset + len(params))
    dims = [threads, 1, 1] + list(grid) + [1] * (3 - len(grid))
    for i, d in enumerate(dims[:6]):
        bank[4 * i:4 * i + 4] = int(d).to_bytes(4, "little")
    bank[0x28:0x2C] = STACK_TOP.to_bytes(4, "little")
    if arch < 90:  # sm_8x read the shared window's generic base from c[0x0][0x18] (sm_90: SR_SWINHI)
        bank[0x18:0x20] = (SHARED_WINDOW_HI << 32).to_bytes(8, "little")
    bank[offset:] = params
    return bytes(bank)


# ---- running a launch -------------------------------------------------------------------------------------------
def run_block(function: sass.Function, const0: bytes, threads: int, ctaid, nctaid, shared_size: int, arch: int,
              max_steps: int = 50_000_000, banks: Optional[Dict[int, bytes]] = None) -> Counts:
    """Warp-instructions one thread block issues (summed over its warps), by instruction address.

    const0: constant bank 0 (``constant_bank``); banks: the compiler's other constant banks
    (``sass.constant_banks`` of the cubin)."""
    return Emulator(function, const0, threads, ctaid, nctaid, shared_size, arch, max_steps, banks).run()
