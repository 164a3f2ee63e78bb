"""nn.BatchNorm2d's update of the running statistics, the case the backends' own update kernels are tested on
(tests/backends/test_cuda_backend.py, tests/kernels/test_batchnorm.py): a problem, its expected buffers and the
check that torch's update (reattn._batchnorm.update_running_stats, lerp in the buffer's dtype) agrees with them.
"""
from typing import Callable, Tuple

import torch
from torch import Tensor

H = 7
MOMENTUM = 0.3


def running_stats_problem(dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """(stats [3, H] float64 (mean, biased variance, count), running_mean [H], running_var [H] a strided view), CPU."""
    g = torch.Generator().manual_seed(8)
    stats = torch.stack([torch.randn(H, generator=g, dtype=torch.float64),
                         torch.rand(H, generator=g, dtype=torch.float64) + 0.1,
                         torch.full((H,), 394.0, dtype=torch.float64)])
    mean0 = torch.randn(H, generator=g, dtype=torch.float64).to(dtype)
    var0 = (torch.rand(2 * H, generator=g, dtype=torch.float64) + 0.5).to(dtype)[::2]
    return stats, mean0, var0


def expected_running_stats(stats: Tensor, mean0: Tensor, var0: Tensor,
                           rounded: Callable[[Tensor], Tensor]) -> Tuple[Tensor, Tensor]:
    """running + momentum (batch - running), the variance unbiased by n / (n - 1), in float64, then ``rounded``."""
    return (rounded(mean0.double() + MOMENTUM * (stats[0] - mean0.double())),
            rounded(var0.double() + MOMENTUM * (stats[1] * stats[2] / (stats[2] - 1) - var0.double())))


def assert_torch_update_agrees(stats: Tensor, mean0: Tensor, var0: Tensor, expected_mean: Tensor,
                               expected_var: Tensor) -> None:
    """torch's update in the buffer's dtype agrees with the expected buffers within its own rounding: a few
    units in the last place of that dtype."""
    from reattn._batchnorm import update_running_stats

    torch_mean, torch_var = mean0.clone(), var0.clone()
    update_running_stats(torch_mean, torch_var, stats[0], stats[1], stats[2][0], MOMENTUM)
    ulp = torch.finfo(mean0.dtype).eps
    torch.testing.assert_close(torch_mean.double(), expected_mean.double(), rtol=4 * ulp, atol=4 * ulp)
    torch.testing.assert_close(torch_var.double(), expected_var.double(), rtol=4 * ulp, atol=4 * ulp)
