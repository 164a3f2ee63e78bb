"""The GPU session's smoke step (benchmarks/gpu_smoke.py), run here on CPU tensors with the eager backend."""
import math

import torch

from benchmarks import gpu_smoke


def test_smoke_runs_every_norm_mode_and_passes_eager_against_float64(capsys):
    assert gpu_smoke.main(["--backend", "eager", "--device", "cpu", "--shapes", "tiny", "--dtypes", "fp32"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eager ")]
    assert len(lines) == len(gpu_smoke.NORMS) and all(line.rstrip().endswith("s)") and " ok " in line
                                                      for line in lines)


def test_parameter_gradients_are_compared_as_one_vector():
    # Training BatchNorm's mixing-bias gradient is exactly zero: alone it has no scale to be relative to.
    ref = {"out": torch.ones(3), "dq": torch.ones(3), "dk": torch.ones(3), "dv": torch.ones(3),
           "dbias": torch.zeros(2), "dweight": torch.full((4,), 2.0)}
    got = dict(ref, dbias=torch.full((2,), 1e-9, dtype=torch.float64), dq=torch.tensor([1.0, 1.0, math.inf]))
    errors = gpu_smoke.relative_errors(got, ref)
    assert math.isclose(errors["dparams"], 1e-9 / 2.0) and errors["out"] == 0.0 and errors["dq"] == math.inf
