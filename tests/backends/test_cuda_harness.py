"""The device-code harness of the CUDA backend (csrc/cuda/device.cuh, csrc/cuda/sim.cpp).

The fused CUDA kernels are written once against device.cuh: inline PTX under nvcc, the host
emulator in a C++ build, which runs every thread of a block as a fiber with its own registers and
computes each warp collective (mma.sync, ldmatrix, shfl.sync) from all 32 lanes with the PTX ISA's
fragment layouts. These tests pin those semantics down with the check kernels of
csrc/cuda/device_checks.cuh: against plain matrix products on the CPU, and - on a GPU - the same
kernels compiled, so the emulator's reading of the ISA is checked against the hardware.
"""
import pytest
import torch

from reattn._extension import _C

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
(MMA_ROW_MAJOR_B, MMA_TRANSPOSED_B, SHUFFLES, RACE, BARRIER, MISSING_WAIT, DIVERGENT, MISALIGNED_STORE,
 BF16_PRODUCTS, MOVMATRIX) = range(10)
FORWARD, REVERSE, SHUFFLED = range(3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("values", ["integers", "normal"])
def test_mma_and_ldmatrix_fragments_give_the_matrix_product(dtype, values):
    # Small integers make every product and sum exact, so any misplaced fragment element shows;
    # normal values check the fp32 accumulation (16-bit products are exact in fp32).
    g = torch.Generator().manual_seed(0)
    if values == "integers":
        a = torch.randint(-4, 5, (16, 32), generator=g).to(dtype)
        b = torch.randint(-4, 5, (32, 16), generator=g).to(dtype)
    else:
        a, b = torch.randn(16, 32, generator=g).to(dtype), torch.randn(32, 16, generator=g).to(dtype)
    expected = a.double() @ b.double()
    # Each output sums 32 products in fp32: error below 32 * 2^-24 * sum |a_k b_k|.
    bound = 32 * 2.0 ** -24 * (a.double().abs() @ b.double().abs())
    a, b = a.to(DEVICE), b.to(DEVICE)
    for kind, operand in ((MMA_ROW_MAJOR_B, b), (MMA_TRANSPOSED_B, b.t().contiguous())):
        for order in (FORWARD, REVERSE):
            got = _C.cuda_device_check(kind, a, operand, order).view(16, 16).double().cpu()
            assert ((got - expected).abs() <= bound).all(), (kind, order, (got - expected).abs().max())


def test_shuffles_reduce_and_rotate():
    a = torch.randn(32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = _C.cuda_device_check(SHUFFLES, a).cpu()
    torch.testing.assert_close(out[:32], a.cpu().sum().expand(32), rtol=1e-6, atol=1e-6)
    assert torch.equal(out[32:], a.cpu().roll(-1))


def test_bf16_pair_products_round_once():
    # fma.rn.bf16x2 with a -0 addend (the backward's dS = P~ (dP' - D), mixing.cuh grad_scores): each product
    # rounded once to nearest even, signed zeros kept. Two bf16 values' product is exact in fp32 (here, away
    # from fp32's subnormals), so torch's fp32 product rounded to bf16 is that one rounding.
    g = torch.Generator().manual_seed(4)
    a = torch.randn(64, generator=g) * 2.0 ** torch.randint(-20, 21, (64,), generator=g)
    b = torch.randn(64, generator=g) * 2.0 ** torch.randint(-20, 21, (64,), generator=g)
    # a tie (1.5 (1 + 2^-7) = 1 + 2^-1 + 2^-7 + 2^-8: rounds up to even), zero times negative (-0), and -0 times 0
    a[:3] = torch.tensor([1.5, 0.0, -0.0])
    b[:3] = torch.tensor([1.0 + 2.0 ** -7, -3.0, 0.0])
    a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
    expected = (a.float() * b.float()).to(torch.bfloat16)
    got = _C.cuda_device_check(BF16_PRODUCTS, a.to(DEVICE), b.to(DEVICE)).cpu()
    assert torch.equal(got, expected.float()), (got - expected.float()).abs().max()
    assert got[0] == 1.515625 and torch.equal(got[1:3].sign(), torch.zeros(2))
    assert torch.equal(torch.signbit(got[1:3]), torch.tensor([True, True]))


def test_movmatrix_transposes_the_fragment_layout():
    # movmatrix.trans (the key pass's dO^T fragments, keys.cuh grad_values): lane l holds row l / 4, columns
    # 2 (l % 4), 2 (l % 4) + 1 of an 8 x 8 matrix and gets the same entries of its transpose. Distinct values
    # (0 .. 63, exact in bf16) make any misplaced element show.
    a = torch.arange(64, dtype=torch.float32).view(8, 8).to(torch.bfloat16)
    got = _C.cuda_device_check(MOVMATRIX, a.to(DEVICE)).cpu().view(8, 8)
    assert torch.equal(got, a.float().t()), got


@pytest.mark.skipif(DEVICE == "cuda", reason="warp orders are the emulator's")
def test_a_race_between_warps_changes_the_result_with_the_warp_order():
    a = torch.randn(32, generator=torch.Generator().manual_seed(2))
    forward = _C.cuda_device_check(RACE, a, order=FORWARD)
    backward = _C.cuda_device_check(RACE, a, order=REVERSE)
    assert torch.equal(forward[:32], a)  # warp 0 happened to write first
    assert backward[:32].isnan().all()  # warp 1 read the NaN bytes shared memory starts with
    for order in (FORWARD, REVERSE, SHUFFLED):  # with the barrier every order agrees
        assert torch.equal(_C.cuda_device_check(BARRIER, a, order=order, seed=order)[:32], a)


@pytest.mark.skipif(DEVICE == "cuda", reason="the emulator's poisoning of in-flight copies")
def test_cp_async_data_lands_only_at_the_wait():
    a = torch.randn(32, generator=torch.Generator().manual_seed(3))
    out = _C.cuda_device_check(MISSING_WAIT, a)
    assert out[0].isnan()  # lane 0 read its own copy before waiting for it


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the behaviour is undefined, not an error")
def test_a_collective_reached_by_half_a_warp_is_refused():
    with pytest.raises(RuntimeError, match="only 16 of 32 lanes of warp 0 reached shfl.sync"):
        _C.cuda_device_check(DIVERGENT, torch.zeros(32))


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU a misaligned store faults the context")
def test_a_misaligned_global_store_is_refused():
    # The kernels store 16-bit outputs in pairs (dev::store_pair); a GPU faults on a 32-bit store that
    # is not 4-byte aligned (every other row of an odd row stride, e.g. D = 35), x86 would not.
    with pytest.raises(RuntimeError, match="4-byte global store at an address that is not a multiple of 4"):
        _C.cuda_device_check(MISALIGNED_STORE, torch.zeros(32))


def test_bad_check_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown check kind"):
        _C.cuda_device_check(99, torch.zeros(32))
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        _C.cuda_device_check(MMA_ROW_MAJOR_B, torch.zeros(16, 32), torch.zeros(32, 16))
    with pytest.raises(TypeError, match="takes bfloat16 operands"):
        _C.cuda_device_check(BF16_PRODUCTS, torch.zeros(64), torch.zeros(64))
    with pytest.raises(ValueError, match="b must be 64 contiguous bfloat16"):
        _C.cuda_device_check(BF16_PRODUCTS, torch.zeros(64, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="movmatrix check takes a bfloat16 matrix"):
        _C.cuda_device_check(MOVMATRIX, torch.zeros(8, 8))
    with pytest.raises(ValueError, match="contiguous 8 x 8 bfloat16 matrix"):
        _C.cuda_device_check(MOVMATRIX, torch.zeros(8, 16, dtype=torch.bfloat16)[:, :8])
