"""benchmarks.sass on checked-in SASS: parsing, instruction classes, loops, bytes and FLOPs per instruction.

``data/toy_loops_sm90.sass`` is ``nvdisasm -c -gi`` of ``tests/benchmarks/toy_kernels.py``'s kernel
compiled for sm_90 (N, M runtime; BLOCK=64, CHUNKS=2, SCALE=True, 2 warps; Triton 3.9); regenerate
it with ``python -m tests.benchmarks._compiled_checks regenerate`` after changing that kernel.
"""
from pathlib import Path

import pytest

from benchmarks import sass

DATA = Path(__file__).parent / "data"


def _toy():
    functions = sass.parse_nvdisasm((DATA / "toy_loops_sm90.sass").read_text())
    assert list(functions) == ["toy_loops_kernel"]
    return functions["toy_loops_kernel"]


def test_parses_instructions_labels_and_line_information():
    fn = _toy()
    assert fn.instructions[0].address == 0 and fn.instructions[0].opcode == "LDC"
    addresses = [ins.address for ins in fn.instructions]
    assert addresses == sorted(addresses) and len(set(addresses)) == len(addresses)
    branches = [ins for ins in fn.instructions if ins.base == "BRA"]
    assert branches and all(ins.target is not None for ins in branches)
    guarded = [ins for ins in fn.instructions if ins.guard]
    assert guarded and all(ins.guard.startswith("@") for ins in guarded)
    # The helper's loop is inlined: its line (8) comes with the call site (21) in the chain.
    inlined = [ins.location for ins in fn.instructions if ins.location and ins.location[0][1] == 8]
    assert inlined and all(len(loc) == 2 and loc[1][1] == 21 for loc in inlined)
    assert all(loc[0][0].endswith("toy_kernels.py") for loc in inlined)


def test_loops_are_backward_branches_nested_by_containment():
    fn = _toy()
    tops = fn.loops
    # The compiler versioned the outer loop (M > 0 / M <= 0) and unrolled the helper's loop by 4 with a
    # remainder loop: two top-level loops at line 17, two nested loops at line 8 in the first.
    assert [(loop.location[0][1], [c.location[0][1] for c in loop.children]) for loop in tops] == [(17, [8, 8]),
                                                                                                 (17, [])]
    inner = tops[0].children[0]
    assert inner.parent is tops[0] and inner.depth == 1
    assert tops[0].head <= inner.head <= inner.tail <= tops[0].tail
    # The end-of-function trap (BRA to itself after EXIT) is not a loop.
    trap = [ins for ins in fn.instructions if ins.base == "BRA" and ins.target == ins.address]
    assert trap and all(not any(lp.head == t.address for lp in fn.all_loops()) for t in trap)


def test_overlapping_loops_are_refused():
    ins = [sass.Instruction(0x00, "", "NOP", ""), sass.Instruction(0x10, "", "NOP", ""),
           sass.Instruction(0x20, "@P0", "BRA", "", target=0x00), sass.Instruction(0x30, "@P1", "BRA", "", target=0x10),
           sass.Instruction(0x40, "", "EXIT", "")]
    with pytest.raises(ValueError, match="overlap"):
        sass.loop_forest(ins)


@pytest.mark.parametrize("opcode, cls", [
    ("HMMA.16816.F32.BF16", "tensor"), ("HGMMA.64x64x16.F32.BF16", "tensor"), ("MUFU.EX2", "mufu"),
    ("FFMA", "fp32"), ("FMNMX", "fp32"), ("FSEL", "fp32"), ("DFMA", "fp64"), ("F2FP.BF16.F32.PACK_AB", "convert"),
    ("I2F.U32.RP", "convert"), ("LDS.128", "shared"), ("LDSM.16.M88.4", "shared"), ("STS", "shared"),
    ("LDG.E.128", "global"), ("LDGSTS.E.BYPASS.128", "global"), ("REDG.E.ADD.F32.FTZ.RN.STRONG.GPU", "global"),
    ("UTMALDG.2D", "global"), ("LD.E", "generic"), ("LDL.64", "local"), ("STL", "local"),
    ("BAR.SYNC.DEFER_BLOCKING", "barrier"), ("MEMBAR.ALL.GPU", "barrier"), ("SHFL.BFLY", "shuffle"),
    ("IMAD.WIDE.U32", "integer"), ("LOP3.LUT", "integer"), ("ULDC.64", "integer"), ("BRA", "control"),
    ("BSSY", "control"), ("EXIT", "control"), ("SOMETHINGNEW", "other")])
def test_instruction_classes(opcode, cls):
    assert sass.instruction_class(sass.Instruction(0, "", opcode, "R0, R1")) == cls


def test_tensor_flops_per_warp_issue():
    flops = lambda op, operands="R0, R4, R8, R0": sass.tensor_flops(sass.Instruction(0, "", op, operands))  # noqa
    assert flops("HMMA.16816.F32.BF16") == 2 * 16 * 8 * 16
    assert flops("HMMA.1688.F32.TF32") == 2 * 16 * 8 * 8
    assert flops("DMMA.884") == 2 * 8 * 8 * 4
    # wgmma: one warpgroup operation, issued by each of its four warps.
    assert flops("HGMMA.64x128x16.F32.BF16", "R24, gdesc[UR4], R24") == 2 * 64 * 128 * 16 // 4
    assert flops("FFMA") == 0


def test_memory_bytes_per_warp_issue():
    b = lambda op, operands="R0, [R2]": sass.memory_bytes(sass.Instruction(0, "", op, operands))  # noqa: E731
    assert b("LDS") == 32 * 4 and b("LDS.128") == 32 * 16 and b("STS.U16") == 32 * 2 and b("LDS.U8") == 32
    assert b("LDG.E.64") == 32 * 8 and b("LDGSTS.E.BYPASS.128") == 32 * 16
    assert b("LDSM.16.M88.4") == 4 * 128 and b("LDSM.16.MT88.2") == 2 * 128
    assert b("REDG.E.ADD.F64.RN.STRONG.GPU") == 32 * 8
    # wgmma reads B (k x N) from shared memory, and A too when it is a descriptor; a quarter per warp.
    assert b("HGMMA.64x64x16.F32.BF16", "R24, gdesc[UR4], R24") == (64 * 16 * 2 + 64 * 16 * 2) // 4
    assert b("HGMMA.64x64x16.F32.BF16", "R24, R120, gdesc[UR8], R24") == (64 * 16 * 2) // 4
    assert b("FFMA", "R0, R1, R2, R3") == 0
    # A never-true guard (ptxas's padding around cp.async) moves nothing; a real predicate counts every lane.
    assert sass.memory_bytes(sass.Instruction(0, "@!PT", "LDS", "RZ, [RZ]")) == 0
    assert sass.memory_bytes(sass.Instruction(0, "@!P0", "LDS", "R0, [R2]")) == 32 * 4


def test_resource_usage_parsing():
    text = """
Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:16
 Function _re_attention_fwd_kernel:
  REG:224 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:760 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _spilling_kernel:
  REG:32 STACK:6456 SHARED:0 LOCAL:0 CONSTANT[0]:760 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    res = sass.parse_resource_usage(text)
    assert res["_re_attention_fwd_kernel"] == sass.Resources(224, 0, 0, 1024)
    assert res["_spilling_kernel"].registers == 32 and res["_spilling_kernel"].stack == 6456
    spilling = sass.Function("k", [sass.Instruction(0, "", "STL.64", "[R1+0x10], R2")])
    clean = sass.Function("k", [sass.Instruction(0, "", "FFMA", "R0, R1, R2, R3")])
    assert sass.spill_bytes(res["_spilling_kernel"], spilling) == 6456
    assert sass.spill_bytes(sass.Resources(32, 0, 0, 0), clean) == 0
