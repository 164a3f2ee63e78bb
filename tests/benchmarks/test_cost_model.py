"""benchmarks.cost_model: occupancy, the per-launch bounds and the eager per-op time, on small known inputs."""
import math

import pytest

from benchmarks import cost_model
from benchmarks.cost_model import A100_SXM, H100_SXM, H200, Work


def test_constants_are_stated_with_sources():
    for gpu in (H100_SXM, H200, A100_SXM):
        assert gpu.sources, gpu.name
        assert all(isinstance(s, str) and s for s in gpu.sources.values())
    # The datasheets' dense bf16 figure follows from SMs x FLOP/clock x clock.
    assert math.isclose(H100_SXM.sms * H100_SXM.wgmma_flops_per_clk * H100_SXM.clock_ghz * 1e9, 989e12, rel_tol=0.01)
    assert math.isclose(A100_SXM.sms * A100_SXM.mma_sync_flops_per_clk * A100_SXM.clock_ghz * 1e9, 312e12,
                        rel_tol=0.01)
    assert H200.hbm_tb_s > H100_SXM.hbm_tb_s
    table = cost_model.constants_table()
    assert "H100-SXM" in table and "A100-SXM" in table and "mma.sync" in table


@pytest.mark.parametrize("gpu, regs, threads, shared, expected", [
    (H100_SXM, 190, 128, 91648, 2),     # csrc/cuda forward at DeiT-S: registers allow 2, shared memory 2
    (H100_SXM, 224, 256, 108032, 1),    # the Triton forward at DeiT-S: 224 x 256 registers = 57,344 of 65,536
    (H100_SXM, 32, 128, 0, 16),         # threads: 64 warps / 4
    (H100_SXM, 32, 32, 0, 32),          # the 32-block limit
    (H100_SXM, 122, 256, 66560, 2),     # registers: 128 x 256 = 32,768 per block
    (A100_SXM, 122, 256, 66560, 2),     # shared memory: 167,936 / (66,560 + 1,024)
    (A100_SXM, 64, 128, 100000, 1),
    (H100_SXM, 64, 128, 240000, 0),     # over the per-block limit: does not launch
    (H100_SXM, 256, 128, 0, 0),         # over 255 registers
])
def test_blocks_per_sm(gpu, regs, threads, shared, expected):
    assert cost_model.blocks_per_sm(gpu, regs, threads, shared) == expected


def test_launch_time_bounds():
    gpu = H100_SXM
    work = Work(instructions={"fp32": 4000.0, "integer": 2000.0, "mufu": 100.0, "tensor": 64.0},
                hmma_flops=64 * 4096.0, shared_bytes=10000.0, l2_bytes=50000.0)
    programs = 2 * gpu.sms * 2 + 1  # two blocks per SM, two full waves and one program more
    t = cost_model.launch_time(gpu, work, programs, threads=128, registers=128, shared=100000, hbm_bytes=1e6)
    assert t.blocks_per_sm == 2 and t.waves == 3
    per_sm = t.waves * t.blocks_per_sm  # the partial last wave costs a whole one
    cycles = gpu.clock_ghz * 1e3
    assert math.isclose(t.resources_us["issue"], per_sm * 6164 / 4 / cycles)
    assert math.isclose(t.resources_us["tensor"], per_sm * 64 * 4096 / gpu.mma_sync_flops_per_clk / cycles)
    assert math.isclose(t.resources_us["mufu"], per_sm * 100 / (16 / 32) / cycles)
    assert math.isclose(t.resources_us["integer"], per_sm * 2000 / 2 / cycles)
    assert math.isclose(t.resources_us["hbm"], 1e6 / (gpu.hbm_tb_s * 1e6))
    # L2: the lower bound moves the unique bytes only; the upper bound every requested byte.
    assert math.isclose(t.resources_us["l2"], min(programs * 50000, 1e6) / (gpu.l2_tb_s * 1e6))
    assert t.t_low_us == max(t.resources_us.values()) and t.bound == max(t.resources_us, key=t.resources_us.get)
    pipes = per_sm * (4000 / 4 + 2000 / 2 + 100 / 0.5) / cycles
    expected_high = (pipes + t.resources_us["tensor"] + t.resources_us["shared"]
                     + programs * 50000 / (gpu.l2_tb_s * 1e6) + t.resources_us["hbm"] + gpu.launch_us)
    assert math.isclose(t.t_high_us, expected_high)
    assert t.t_low_us <= t.t_high_us


def test_wgmma_needs_hopper_and_blocks_must_fit():
    work = Work(instructions={"tensor": 1.0}, hgmma_flops=1e6)
    assert cost_model.launch_time(H100_SXM, work, 1, 128, 64, 0, 0).resources_us["tensor"] > 0
    with pytest.raises(ValueError, match="wgmma"):
        cost_model.launch_time(A100_SXM, work, 1, 128, 64, 0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        cost_model.launch_time(H100_SXM, Work(), 1, 128, 64, 300000, 0)


def test_eager_op_time():
    lo, hi = cost_model.eager_op_time(H100_SXM, bytes_moved=3.35e6, flops=0.0, tensor=False)
    assert math.isclose(lo, 1.0) and math.isclose(hi, 1.0 + H100_SXM.launch_us)
    flops = 989.4e12 * 1e-6  # one microsecond of dense bf16 at the datasheet rate
    lo, hi = cost_model.eager_op_time(H100_SXM, bytes_moved=0.0, flops=flops, tensor=True)
    assert math.isclose(lo, 1.0, rel_tol=0.01)
