"""Which fused backend can run on which GPU: compute capability, compiled archs, shared memory.

No GPU here: the device queries (capability, name, shared memory per block) are replaced by the
values of real GPUs, and ``reattn.backends.unavailable_reason`` / ``resolve_backend`` must refuse,
with a reason naming the GPU, exactly where the kernels could not run, and ``auto`` must then
take the next backend that can. What the kernels need per GPU is checked against the real
compiler in tests/kernels/test_aot.py.
"""
import pytest
import torch

from reattn import backends
from reattn.backends import Problem, cuda_arch_runs, resolve_backend, unavailable_reason
from reattn.kernels import launch

# name, compute capability, shared memory per block (opt-in) in bytes
GPUS = {
    "T4": ("Tesla T4", (7, 5), 65536),
    "A100": ("NVIDIA A100-SXM4-80GB", (8, 0), 166912),
    "A10": ("NVIDIA A10", (8, 6), 101376),
    "RTX 4090": ("NVIDIA GeForce RTX 4090", (8, 9), 101376),
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0), 232448),
    "B200": ("NVIDIA B200", (10, 0), 232448),
}


@pytest.fixture
def gpu(monkeypatch):
    """Pretend cuda:0 is the named GPU (and that reattn._C was built for sm_80 and sm_90)."""
    def use(name, archs="80,90"):
        full_name, capability, shared = GPUS[name]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: full_name)
        monkeypatch.setattr(launch, "device_shared_limit", lambda device: shared)

        class FakeExtension:
            @staticmethod
            def build_info():
                return {"cuda": True, "cuda_archs": archs, "openmp": True, "torch_version": torch.__version__}

            cuda_forward = re_attention_cpu_forward = re_attention_cpu_gram_sums = object()

        import reattn._extension as extension

        monkeypatch.setattr(extension, "_C", FakeExtension)
        monkeypatch.setattr(extension, "BUILD_INFO", FakeExtension.build_info())
        monkeypatch.setattr(backends, "extension_error_message", lambda: None)
        return torch.device("cuda", 0)
    return use


def problem(device, heads=6, head_dim=64, needs_grad=True, **kw):
    return Problem(device, heads=heads, head_dim=head_dim, needs_grad=needs_grad, dtype=torch.bfloat16, **kw)


@pytest.mark.parametrize("archs,capability,runs", [
    ([80, 90], (8, 0), True), ([80, 90], (8, 6), True), ([80, 90], (8, 9), True),  # sm_80 SASS on 8.x
    ([80, 90], (9, 0), True), ([80, 90], (10, 0), True), ([80, 90], (12, 0), True),  # PTX of compute_90
    ([80, 90], (7, 5), False), ([80, 90], (7, 0), False),
    ([86], (8, 0), False), ([86], (8, 9), True), ([75, 80], (7, 5), True), ([90], (8, 9), False),
])
def test_which_gpus_the_compiled_archs_run_on(archs, capability, runs):
    assert cuda_arch_runs(archs, capability) is runs


@pytest.mark.parametrize("name", ["A100", "A10", "RTX 4090", "H100", "B200"])
@pytest.mark.parametrize("heads,head_dim", [(6, 64), (12, 32), (12, 35), (16, 128), (32, 128), (1, 1)])
def test_triton_runs_every_shape_on_ampere_and_newer(gpu, name, heads, head_dim):
    # Every H <= 32, D <= 128 fits: the launch rules shrink the tiles to the GPU's shared memory
    # (kernels/launch.py; down to 16-wide head-dim chunks for 32 heads on the 99 KiB of sm_86/89).
    device = gpu(name)
    assert unavailable_reason("triton", problem(device, heads, head_dim)) is None
    # auto: eager until a recorded GPU measurement shows a fused backend faster (tests/backends/test_auto.py).
    assert resolve_backend("auto", problem(device, heads, head_dim)) == "eager"
    assert resolve_backend("triton", problem(device, heads, head_dim)) == "triton"


def test_a_t4_gets_reasons_naming_it_and_auto_takes_eager(gpu):
    device = gpu("T4")
    reason = unavailable_reason("triton", problem(device))
    assert "compute capability 8.0" in reason and "Tesla T4 (sm_75)" in reason
    reason = unavailable_reason("cuda", problem(device))
    assert "sm_80, sm_90" in reason and "Tesla T4 (sm_75)" in reason and "REATTN_CUDA_ARCHS=75" in reason
    assert resolve_backend("auto", problem(device)) == "eager"
    with pytest.raises(ValueError, match=r"backend='triton' cannot run on cuda:0: .*Tesla T4"):
        resolve_backend("triton", problem(device))


def test_a_t4_with_an_sm75_build_runs_the_cuda_kernels(gpu):
    device = gpu("T4", archs="75,80,90")
    assert unavailable_reason("cuda", problem(device)) is None
    assert resolve_backend("cuda", problem(device)) == "cuda"
    assert resolve_backend("auto", problem(device)) == "eager"  # no GPU measurement shows it faster yet


def test_a_gpu_with_too_little_shared_memory_is_refused_not_crashed(gpu, monkeypatch):
    device = gpu("A10")
    monkeypatch.setattr(launch, "device_shared_limit", lambda device: 16384)
    reason = unavailable_reason("triton", problem(device, heads=32, head_dim=128))
    assert "shared memory" in reason and "this GPU allows 16384" in reason and "NVIDIA A10 (sm_86)" in reason


def test_cuda_tensors_without_a_gpu_are_refused_by_both_gpu_backends(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for backend in ("triton", "cuda"):
        reason = unavailable_reason(backend, problem(torch.device("cuda")))
        assert reason is not None and ("no CUDA GPU" in reason or "not importable" in reason
                                       or "without CUDA" in reason or "predates" in reason), reason
    assert resolve_backend("auto", problem(torch.device("cuda"))) == "eager"


def test_the_cuda_backend_choice_reads_the_build_info_read_at_import(gpu, monkeypatch):
    # Inside torch.compile'd code dynamo cannot trace a pybind11 function: on a GPU, a call of
    # reattn._C.build_info() while choosing the backend broke the graph (fullgraph=True failed).
    device = gpu("H100")
    import reattn._extension as extension

    def untraceable():
        raise AssertionError("reattn._C.build_info() called while choosing a backend")

    monkeypatch.setattr(extension._C, "build_info", staticmethod(untraceable))
    assert unavailable_reason("cuda", problem(device)) is None
    monkeypatch.setattr(extension, "BUILD_INFO", dict(extension.BUILD_INFO, cuda_archs="100"))
    assert "built for sm_100" in unavailable_reason("cuda", problem(device))


def test_triton_refuses_float64_on_a_gpu_saying_why(gpu):
    # Its float arguments reach the compiled kernels as fp32 (measured on an H200: ~1e-8 relative errors).
    device = gpu("H100")
    reason = unavailable_reason("triton", Problem(device, heads=6, head_dim=64, needs_grad=True, dtype=torch.float64))
    assert reason is not None and "float64" in reason and "backend='cuda' or 'eager'" in reason
    assert unavailable_reason("cuda", Problem(device, heads=6, head_dim=64, needs_grad=True,
                                              dtype=torch.float64)) is None
    assert resolve_backend("auto", Problem(device, heads=6, head_dim=64, needs_grad=True,
                                           dtype=torch.float64)) == "eager"
