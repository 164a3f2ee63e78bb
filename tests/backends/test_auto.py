"""backend="auto" on CUDA tensors: a fused backend only where a recorded GPU measurement shows it faster.

Checked without a GPU: the device queries answer as an H100's; measurements are injected as
``reattn.backends.measured`` would hold them (today it holds none: no GPU has run the kernels).
"""
import pytest
import torch

import reattn
from reattn.backends import BackendChoice, Problem, choose_backend, measured_speedup, resolve_backend
from reattn.backends.measured import GPU_MEASUREMENTS, Measurement


@pytest.fixture
def h100(monkeypatch):
    from reattn.kernels import launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(launch, "device_shared_limit", lambda device: 232448)


def problem(**kw):
    base = dict(heads=6, head_dim=64, dtype=torch.bfloat16, n_queries=197, n_keys=197, needs_grad=True, norm="layer")
    base.update(kw)
    return Problem(torch.device("cuda"), **base)


def measurement(speedup, backend="triton", tokens=197, mode="fwd+bwd", norm="layer", device="NVIDIA H100 80GB HBM3"):
    return Measurement(device=device, dtype="bfloat16", heads=6, tokens=tokens, head_dim=64, mode=mode, norm=norm,
                       backend=backend, batch=256, speedup=speedup, date="2026-12-01T00:00:00", commit="abc1234")


def test_no_gpu_measurement_is_recorded_so_auto_runs_eager(h100):
    assert GPU_MEASUREMENTS == ()  # regenerate with python -m benchmarks.auto_table once a GPU has run them
    for kw in (dict(), dict(needs_grad=False), dict(norm="batch", batchnorm_training=True), dict(norm="none")):
        assert resolve_backend("auto", problem(**kw)) == "eager"
    choice = choose_backend("auto", problem())
    assert choice.backend == "eager"
    assert "no GPU measurement" in choice.reasons["triton"] and "NVIDIA H100" in choice.reasons["triton"]
    assert "no fused backend is measured faster" in choice.reasons["eager"]
    # Explicit choices keep working.
    assert resolve_backend("triton", problem()) == "triton"
    assert choose_backend("triton", problem()).backend == "triton"


def test_a_measurement_faster_than_eager_in_the_regime_decides(h100):
    rows = (measurement(2.5),)
    choice = choose_backend("auto", problem(), rows)
    assert choice.backend == "triton" and "2.50x faster" in choice.reasons["triton"]
    assert "abc1234" in choice.reasons["triton"]
    # Sequence lengths within a factor of two of the measured one are covered; others are not.
    assert choose_backend("auto", problem(n_queries=300, n_keys=300), rows).backend == "triton"
    assert choose_backend("auto", problem(n_queries=577, n_keys=577), rows).backend == "eager"
    # Another mode, norm, dtype, head count or GPU model is another regime.
    assert choose_backend("auto", problem(needs_grad=False), rows).backend == "eager"
    assert choose_backend("auto", problem(norm="none"), rows).backend == "eager"
    assert choose_backend("auto", problem(dtype=torch.float16), rows).backend == "eager"
    assert choose_backend("auto", problem(heads=12), rows).backend == "eager"
    assert choose_backend("auto", problem(), (measurement(2.5, device="NVIDIA A100-SXM4-80GB"),)).backend == "eager"


def test_slower_measurements_and_the_cuda_backend(h100, monkeypatch):
    import reattn.backends as backends

    slower = (measurement(0.7),)
    choice = choose_backend("auto", problem(), slower)
    assert choice.backend == "eager" and "0.70x" in choice.reasons["triton"] and "not faster" in choice.reasons["triton"]
    # The CUDA C++ backend is considered after Triton, on its own measurements.
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, p: None)
    rows = (measurement(0.7), measurement(1.3, backend="cuda"))
    assert choose_backend("auto", problem(), rows).backend == "cuda"
    speedup, row = measured_speedup(problem(), "cuda", "NVIDIA H100 80GB HBM3", rows)
    assert speedup == 1.3 and row.backend == "cuda"


def test_explain_backend_on_cpu_tensors():
    q = torch.randn(2, 3, 5, 4)
    w = torch.eye(3)
    choice = reattn.explain_backend(q, q, q, w)
    assert isinstance(choice, BackendChoice) and choice.backend in ("cpu", "eager")
    assert set(choice.reasons) == set(reattn.BACKENDS)
    assert "backend:" in str(choice)
    assert reattn.explain_backend(q, q, q, w, backend="eager").backend == "eager"
    with pytest.raises(ValueError, match="mix_weight"):
        reattn.explain_backend(q, q, q, torch.eye(2))


def test_the_measured_table_is_generated_from_the_benchmark_csv(tmp_path):
    from benchmarks import auto_table

    assert auto_table.main(["--check"]) == 0
    rows = [dict(device_type="cuda", status="ok", provider="triton", speedup_vs_eager="1.7", device="NVIDIA H200",
                 dtype="bfloat16", H="6", N="197", D="64", mode="fwd", norm="layer", batch="256",
                 date="2026-12-02T10:00:00", commit="f00"),
             dict(device_type="cuda", status="ok", provider="eager", speedup_vs_eager="1.0", device="NVIDIA H200",
                  dtype="bfloat16", H="6", N="197", D="64", mode="fwd", norm="layer", batch="256",
                  date="2026-12-02T10:00:00", commit="f00"),
             dict(device_type="cpu", status="ok", provider="cpu", speedup_vs_eager="3.0", device="Xeon",
                  dtype="float32", H="6", N="197", D="64", mode="fwd", norm="layer", batch="8",
                  date="2026-12-02T10:00:00", commit="f00")]
    table = auto_table.measurements(rows)
    assert table == [("NVIDIA H200", "bfloat16", 6, 197, 64, "fwd", "layer", "triton", 256, 1.7,
                      "2026-12-02T10:00:00", "f00")]
    text = auto_table.render(table)
    namespace = {}
    exec(text, namespace)  # noqa: S102 - the generated module, as Python would import it
    (m,) = namespace["GPU_MEASUREMENTS"]
    assert m.device == "NVIDIA H200" and m.speedup == 1.7 and m.backend == "triton"
