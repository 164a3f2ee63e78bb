"""benchmarks.sass_exec: the SASS control-flow emulator on small programs whose counts are known by hand.

The programs are written in nvdisasm's syntax (as ``benchmarks.sass.parse_nvdisasm`` reads it); the
integer-division sequence is copied from nvcc's output for ``unsigned / unsigned`` (sm_90).
"""
import struct

import numpy as np
import pytest

from benchmarks import sass, sass_exec


def program(body: str) -> sass.Function:
    lines = [".text.toy:"]
    address = 0
    for raw in body.strip().splitlines():
        raw = raw.strip()
        if raw.endswith(":"):
            lines.append(raw)
            continue
        lines.append(f"        /*{address:04x}*/                   {raw} ;")
        address += 16
    return sass.parse_nvdisasm("\n".join(lines))["toy"]


def params(*words: int) -> bytes:
    return b"".join(struct.pack("<I", w & 0xFFFFFFFF) for w in words)


def run(fn, words=(), threads=32, ctaid=(0, 0, 0), grid=(1, 1, 1), shared=0):
    return sass_exec.run_block(fn, sass_exec.constant_bank(params(*words), 90, threads, grid), threads, ctaid, grid,
                               shared, 90)


def issued(fn, counts, opcode_prefix):
    return [counts.issued.get(ins.address, 0) for ins in fn.instructions if ins.text.startswith(opcode_prefix)]


# for (i = threadIdx.x; i < n; i += blockDim.x) body: the item loop of csrc/cuda/block.cuh.
ITEM_LOOP = """
S2R R0, SR_TID.X
LDC R2, c[0x0][0x0]
LDC R1, c[0x0][0x210]
ISETP.GE.AND P0, PT, R0, R1, PT
@P0 EXIT
.L_x_0:
FADD R5, R5, 1
IADD3 R0, R0, R2, RZ
ISETP.GE.AND P0, PT, R0, R1, PT
@!P0 BRA `(.L_x_0)
EXIT
.L_x_1:
BRA `(.L_x_1)
"""


def test_item_loop_runs_as_long_as_its_longest_lane_per_warp():
    fn = program(ITEM_LOOP)
    counts = run(fn, [300], threads=128)
    # Warps 0 and 1 (threads 0-63) run 3 items per lane, warps 2 and 3 (64-127) two: 3 + 3 + 2 + 2.
    assert issued(fn, counts, "FADD") == [10]
    assert issued(fn, counts, "S2R") == [4]  # every warp runs the prologue once
    assert not counts.unknown_branches and not counts.unmodelled
    # n = 40: warp 0 runs one item, warp 1 (threads 32-63) one (lanes 32-39), warps 2, 3 none.
    counts = run(fn, [40], threads=128)
    assert issued(fn, counts, "FADD") == [2]
    assert issued(fn, counts, "@P0 EXIT") == [4]


def test_a_branch_with_a_predicate_operand_needs_its_guard_and_the_operand():
    # for (i = lane; i < 32 && i < n; i += 8): ptxas tests `i < n` in the guard and carries `i + 8 < 32`
    # in the branch's own predicate operand (`@!P1 BRA P0, target`). Every lane runs 4 items at n = 300
    # (the operand ends the loop), 2 at n = 16 (the guard does).
    fn = program("""
S2R R0, SR_LANEID
LDC R1, c[0x0][0x210]
LOP3.LUT R0, R0, 0x7, RZ, 0xc0, !PT
.L_x_0:
FADD R5, R5, 1
ISETP.LT.AND P0, PT, R0, 0x18, PT
IADD3 R0, R0, 0x8, RZ
ISETP.GE.AND P1, PT, R0, R1, PT
@!P1 BRA P0, `(.L_x_0)
EXIT
.L_x_1:
BRA `(.L_x_1)
""")
    counts = run(fn, [300])
    assert issued(fn, counts, "FADD") == [4]
    counts = run(fn, [16])
    assert issued(fn, counts, "FADD") == [2]
    assert not counts.unknown_branches


def test_divergent_branches_issue_both_sides_and_reconverge():
    fn = program("""
S2R R0, SR_LANEID
ISETP.GE.AND P0, PT, R0, 0x10, PT
@P0 BRA `(.L_x_0)
FADD R1, R1, 1
FADD R1, R1, 1
BRA `(.L_x_1)
.L_x_0:
FMUL R1, R1, 2
.L_x_1:
FFMA R1, R1, R1, 1
EXIT
""")
    counts = run(fn)
    assert issued(fn, counts, "FADD") == [1, 1] and issued(fn, counts, "FMUL") == [1]
    assert issued(fn, counts, "FFMA") == [1]  # issued once: the lanes reconverged


def test_carries_and_64_bit_compares():
    # 64-bit a = 0x1_0000_0000 - 1 plus 1 (carry into the high word), then a >= 0x1_0000_0000 (ISETP .EX).
    fn = program("""
MOV R2, 0xffffffff
MOV R3, RZ
IADD3 R4, P0, R2, 0x1, RZ
IADD3.X R5, R3, RZ, RZ, P0, !PT
ISETP.GE.U32.AND P1, PT, R4, RZ, PT
ISETP.GE.U32.AND.EX P1, PT, R5, 0x1, PT, P1
@!P1 BRA `(.L_x_0)
FADD R6, R6, 1
.L_x_0:
IMAD.WIDE.U32 R8, R2, R2, RZ
ISETP.EQ.U32.AND P2, PT, R9, 0xfffffffe, PT
@!P2 BRA `(.L_x_1)
FMUL R6, R6, 2
.L_x_1:
EXIT
""")
    counts = run(fn)
    assert issued(fn, counts, "FADD") == [1]  # the carry reached the high word
    assert issued(fn, counts, "FMUL") == [1]  # 0xffffffff^2 = 0xfffffffe_00000001
    assert not counts.unknown_branches


# q = a / b (unsigned), the sequence nvcc emits for sm_90 (from csrc/cuda's forward program), then loop q times.
UDIV = """
LDC R30, c[0x0][0x214]
ULDC UR8, c[0x0][0x210]
I2F.U32.RP R16, R30
ISETP.NE.U32.AND P3, PT, R30, RZ, PT
IMAD.MOV.U32 R143, RZ, RZ, RZ
MUFU.RCP R16, R16
IADD3 R2, R16, 0xffffffe, RZ
F2I.FTZ.U32.TRUNC.NTZ R3, R2
IMAD.MOV.U32 R2, RZ, RZ, RZ
IMAD.MOV R17, RZ, RZ, -R3
IMAD R17, R17, R30, RZ
IMAD.HI.U32 R3, R3, R17, R2
IMAD.HI.U32 R142, R3, UR8, RZ
IADD3 R3, -R142, RZ, RZ
IMAD R3, R30, R3, UR8
ISETP.GE.U32.AND P0, PT, R3, R30, PT
@P0 IMAD.IADD R3, R3, 0x1, -R30
@P0 VIADD R142, R142, 0x1
ISETP.GE.U32.AND P1, PT, R3, R30, PT
@P1 IADD3 R142, R142, 0x1, RZ
@!P3 LOP3.LUT R142, RZ, R30, RZ, 0x33, !PT
ISETP.GE.AND P0, PT, R142, 0x1, PT
@!P0 EXIT
.L_x_0:
FADD R9, R9, 1
IADD3 R142, R142, -0x1, RZ
ISETP.NE.AND P0, PT, R142, RZ, PT
@P0 BRA `(.L_x_0)
EXIT
"""


@pytest.mark.parametrize("a, b", [(197, 16), (577, 64), (1000, 7), (5, 9), (4096, 1)])
def test_integer_division_sequence_is_exact(a, b):
    fn = program(UDIV)
    counts = run(fn, [a, b])
    assert issued(fn, counts, "FADD") == [a // b]
    assert not counts.unknown_branches


def test_shared_memory_values_cross_warps_at_barriers():
    # Warp 0 stores 5 to shared memory; after the barrier warp 1 loads it and loops that many times.
    fn = program("""
S2R R0, SR_TID.X
ISETP.NE.AND P0, PT, R0, RZ, PT
@!P0 MOV R1, 0x5
@!P0 STS [RZ+0x40], R1
BAR.SYNC.DEFER_BLOCKING 0x0
ISETP.LT.AND P1, PT, R0, 0x20, PT
@P1 EXIT
LDS R3, [RZ+0x40]
.L_x_0:
FADD R9, R9, 1
IADD3 R3, R3, -0x1, RZ
ISETP.NE.AND P0, PT, R3, RZ, PT
@P0 BRA `(.L_x_0)
EXIT
""")
    counts = run(fn, threads=64, shared=256)
    assert issued(fn, counts, "FADD") == [5]
    assert not counts.unknown_branches


def test_calls_return_to_the_address_passed():
    fn = program("""
MOV R20, 0x20
CALL.REL.NOINC `($sub)
FADD R1, R1, 1
EXIT
$sub:
FMUL R2, R2, 2
RET.REL.NODEC R20 `(toy)
""")
    counts = run(fn)
    assert issued(fn, counts, "FMUL") == [1] and issued(fn, counts, "FADD") == [1]


def test_branches_on_unknown_data_are_counted_and_slow_paths_avoided():
    fn = program("""
LDG.E R0, desc[UR4][R2.64]
FSETP.GT.AND P0, PT, R0, RZ, PT
@P0 BRA `(.L_x_0)
FADD R1, R1, 1
.L_x_0:
FSETP.GEU.AND P1, PT, |R0|, 1.17549435082228750797e-38, PT
@P1 BRA `(.L_x_1)
MOV R20, 0xa0
CALL.REL.NOINC `($__internal_0_$__cuda_sm20_rcp_rn_f32_slowpath)
.L_x_1:
EXIT
$__internal_0_$__cuda_sm20_rcp_rn_f32_slowpath:
FMUL R2, R2, 2
RET.REL.NODEC R20 `(toy)
""")
    counts = run(fn)
    first = next(i for i in fn.instructions if i.text.startswith("@P0 BRA"))
    assert counts.unknown_branches == {first.address: 1}  # a data-dependent decision: not taken, and said so
    assert issued(fn, counts, "FADD") == [1]
    assert issued(fn, counts, "FMUL") == [0]  # the math library's slow path is not entered
    assert issued(fn, counts, "CALL") == [0]


def test_a_compare_on_data_decided_by_a_known_predicate_is_known():
    # P1 = (x == 0) OR !P5 with P5 known false (no dropout): true whatever x is, so no unknown decision;
    # P2 = (x > 0) AND P5: false whatever x is.
    fn = program("""
LDC R1, c[0x0][0x210]
ISETP.NE.AND P5, PT, R1, RZ, PT
LDG.E R0, desc[UR4][R2.64]
FSETP.EQ.OR P1, PT, R0, RZ, !P5
@P1 BRA `(.L_x_0)
FADD R4, R4, 1
.L_x_0:
ISETP.GT.AND P2, PT, R0, RZ, P5
@P2 BRA `(.L_x_1)
FADD R5, R5, 1
.L_x_1:
EXIT
""")
    counts = run(fn, [0])
    assert not counts.unknown_branches
    assert issued(fn, counts, "FADD") == [0, 1]
    counts = run(fn, [1])  # P5 true: both compares depend on the data
    assert len(counts.unknown_branches) == 2


def test_float64_compares_on_known_operands_are_known():
    # DSETP on a float64 parameter (a constant-bank pair, as ULDC.64 loads it) is decided like FSETP: the fold's
    # `center_keys > 0.0`; against data it stays unknown. Words: the double 197.0, then 0.0.
    import struct as _struct

    lo, hi = _struct.unpack("<II", _struct.pack("<d", 197.0))
    fn = program("""
ULDC.64 UR6, c[0x0][0x210]
DSETP.LT.AND P0, PT, RZ, UR6, PT
@!P0 BRA `(.L_x_0)
FADD R4, R4, 1
.L_x_0:
ULDC.64 UR8, c[0x0][0x218]
DSETP.GT.AND P1, PT, |UR8|, 0.5, PT
@P1 BRA `(.L_x_1)
FADD R5, R5, 1
.L_x_1:
LDG.E.64 R0, desc[UR4][R2.64]
DSETP.GT.AND P2, PT, R0, RZ, PT
@P2 BRA `(.L_x_2)
FADD R6, R6, 1
.L_x_2:
EXIT
""")
    counts = run(fn, [lo, hi, 0, 0])
    assert issued(fn, counts, "FADD") == [1, 1, 1]  # 0 < 197 (no jump past the first FADD); |0| > 0.5 is false
    third = [i for i in fn.instructions if i.text.startswith("@P2 BRA")][0]
    assert counts.unknown_branches == {third.address: 1}
    counts = run(fn, [0, 0, 0, 0])  # 0 < 0 is false: the first branch is taken past its FADD
    assert issued(fn, counts, "FADD")[0] == 0


def test_flags_merged_into_an_unwritten_register_stay_known():
    # The compiler builds a flag word in a register it never initialized: clear a bit, set it under a known
    # predicate, test it later. Registers start known, so the test is a known decision.
    fn = program("""
LDC R1, c[0x0][0x210]
LOP3.LUT R190, R190, 0xfffffffd, RZ, 0xc0, !PT
ISETP.GT.AND P4, PT, R1, RZ, PT
@P4 LOP3.LUT R190, R190, 0x2, RZ, 0xfc, !PT
LOP3.LUT P6, RZ, R190, 0x2, RZ, 0xc0, !PT
@P6 BRA `(.L_x_0)
FADD R4, R4, 1
.L_x_0:
EXIT
""")
    assert not run(fn, [1]).unknown_branches
    assert issued(fn, run(fn, [1]), "FADD") == [0] and issued(fn, run(fn, [0]), "FADD") == [1]


def test_bra_div_is_taken_only_by_a_diverged_warp():
    # BRA.DIV jumps to the compiler's divergent path only when some live lane of the warp is elsewhere.
    fn = program("""
S2R R0, SR_TID.X
LDC R1, c[0x0][0x210]
ISETP.GE.AND P0, PT, R0, R1, PT
@P0 BRA `(.L_x_1)
BRA.DIV UR4, `(.L_x_2)
FADD R4, R4, 1
.L_x_1:
EXIT
.L_x_2:
FMUL R4, R4, 2
EXIT
""")
    converged = run(fn, [32])
    assert issued(fn, converged, "FADD") == [1] and issued(fn, converged, "FMUL") == [0]
    diverged = run(fn, [16])
    assert issued(fn, diverged, "FADD") == [0] and issued(fn, diverged, "FMUL") == [1]


def test_warps_emulated_together_keep_their_own_votes_shuffles_and_uniform_registers():
    # The block's warps share arrays but not warp-level state: a ballot, a shuffle and a uniform register
    # are each warp's own, and a warp-uniform branch on them is taken per warp.
    fn = program("""
S2R R0, SR_TID.X
LDC R1, c[0x0][0x210]
ISETP.GE.AND P0, PT, R0, R1, PT
VOTE.ANY R2, PT, P0
ISETP.NE.AND P1, PT, R2, RZ, PT
@P1 BRA `(.L_x_0)
FADD R4, R4, 1
.L_x_0:
SHFL.IDX PT, R3, R0, 0x1f, 0x1f
R2UR UR4, R3
IADD3 R6, -R0, UR4, RZ
ISETP.GT.U32.AND P2, PT, R6, 0x1f, PT
@P2 BRA `(.L_x_1)
EXIT
.L_x_1:
FMUL R4, R4, 2
EXIT
""")
    counts = run(fn, [40], threads=128)
    # Only warp 0 (threads 0-31) has every lane below n = 40; lane 31's thread index, shuffled to each lane
    # of its warp and made uniform, is at most 31 above every lane's own in every warp.
    assert issued(fn, counts, "FADD") == [1]
    assert issued(fn, counts, "FMUL") == [0]
    assert issued(fn, counts, "R2UR") == [4] and issued(fn, counts, "EXIT") == [4, 0]
    assert not counts.unknown_branches and not counts.unmodelled


def test_a_warp_waits_at_a_barrier_while_the_others_run_up_to_theirs():
    # Warp 1 (threads 32-63) stores in a block placed after the barrier's code and jumps back to it; warp 0,
    # at the lower program counter, reaches the barrier first and must wait there for warp 1's stores.
    fn = program("""
S2R R0, SR_TID.X
ISETP.GE.AND P0, PT, R0, 0x20, PT
@P0 BRA `(.L_x_2)
.L_x_0:
BAR.SYNC.DEFER_BLOCKING 0x0
LOP3.LUT R7, R0, 0x20, RZ, 0xfc, !PT
LDS R6, [R7.X4]
ISETP.NE.AND P2, PT, R6, 0x7, PT
@P2 BRA `(.L_x_1)
EXIT
.L_x_1:
FMUL R4, R4, 2
EXIT
.L_x_2:
MOV R5, 0x7
STS [R0.X4], R5
BRA `(.L_x_0)
""")
    counts = run(fn, threads=64, shared=256)
    assert issued(fn, counts, "BAR") == [2] and issued(fn, counts, "STS") == [1]
    # Every lane reads the word thread (tid | 32) stored: known and equal to 7 in both warps.
    assert issued(fn, counts, "FMUL") == [0] and not counts.unknown_branches


def test_runaway_loops_stop_with_an_error():
    fn = program("""
.L_x_0:
FADD R1, R1, 1
BRA `(.L_x_0)
""")
    with pytest.raises(sass_exec.EmulationError, match="more than"):
        sass_exec.run_block(fn, sass_exec.constant_bank(b"", 90, 32, (1, 1, 1)), 32, (0, 0, 0), (1, 1, 1), 0, 90,
                            max_steps=1000)


def test_operand_parsing():
    op = sass_exec.parse_operand("c[0x0][0x210]")
    assert (op.kind, op.bank, op.offset) == ("c", 0, 0x210)
    op = sass_exec.parse_operand("desc[UR8][R66.64+0x10]")
    assert op.kind == "mem" and op.offset == 0x10 and op.parts == (("R", 66, 1, True),)
    op = sass_exec.parse_operand("-|R3|")
    assert (op.kind, op.index, op.neg, op.abs) == ("R", 3, True, True)
    assert sass_exec.parse_operand("!UP2").kind == "UP" and sass_exec.parse_operand("!UP2").inv
    assert sass_exec.split_operands("R1, [R2+0x4], desc[UR4][R6.64], `(.L_x_1)") == ["R1", "[R2+0x4]",
                                                                                    "desc[UR4][R6.64]"]
    assert np.isclose(struct.unpack("<f", struct.pack("<I", sass_exec.imm_float_bits("0.5")))[0], 0.5)


def test_known_low_halves_survive_merges_into_unknown_registers():
    # A flag byte merged by PRMT into a register whose high half is unknown, stored as a byte, loaded
    # back and tested with & 1: the branch on it is known (the CUDA programs' attended/kept flags).
    fn = program("""
LDG.E R5, desc[UR4][R2.64]
MOV R6, 0x1
PRMT R5, R6, 0x7610, R5
STS.U8 [RZ+0x10], R5
LDS.U8 R7, [RZ+0x10]
LOP3.LUT P0, RZ, R7, 0x1, RZ, 0xc0, !PT
@!P0 BRA `(.L_x_0)
FADD R9, R9, 1
.L_x_0:
LOP3.LUT R8, R5, 0xff, RZ, 0xc0, !PT
ISETP.NE.AND P1, PT, R8, RZ, PT
@!P1 BRA `(.L_x_1)
FMUL R9, R9, 2
.L_x_1:
EXIT
""")
    counts = run(fn, shared=64)
    assert not counts.unknown_branches
    assert issued(fn, counts, "FADD") == [1] and issued(fn, counts, "FMUL") == [1]


def test_constants_set_on_the_fma_pipe_are_known():
    # ptxas sets registers to constants with HFMA2.MMA (0 x 0 + an fp16 pair): here a loop counter's start (1)
    # and its bound's offset (0) that an integer loop then runs on; unknown, the loop ran once.
    fn = program("""
LDC R1, c[0x0][0x210]
HFMA2.MMA R0, -RZ, RZ, 0, 5.9604644775390625e-08
HFMA2.MMA R4, -RZ, RZ, 0, 0
HFMA2.MMA R6, -RZ, RZ, 1.875, 0
IADD3 R1, R1, R4, RZ
.L_x_0:
FADD R9, R9, 1
IADD3 R0, R0, 0x1, RZ
ISETP.GE.AND P0, PT, R0, R1, PT
@!P0 BRA `(.L_x_0)
ISETP.NE.AND P1, PT, R6, 0x3f800000, PT
@P1 BRA `(.L_x_1)
FMUL R9, R9, 2
.L_x_1:
EXIT
""")
    counts = run(fn, [7])
    assert not counts.unknown_branches and not counts.unmodelled
    assert issued(fn, counts, "FADD") == [6]  # i = 1 .. 6
    assert issued(fn, counts, "FMUL") == [1]  # 1.875, 0 is 1.0f
