"""GPU measurements the ``backend="auto"`` rule trusts, generated from benchmarks/results/microbench.csv.

Do not edit: ``python -m benchmarks.auto_table`` rewrites this file from the CSV's GPU rows
(``device_type == "cuda"``, status ok): for every fused backend, GPU, dtype, shape, mode and norm
measured, its speed-up over the eager official core. On CUDA tensors ``auto`` picks a fused backend
only where a row here shows it faster than eager (``reattn.backends.measured_speedup``).

No GPU has run the fused kernels yet, so there are no rows: ``auto`` runs eager on every GPU (the
static model, ``python -m benchmarks.static_model``, predicts the Triton kernels 1.2-15x slower than
eager at the benchmark shapes in most modes; nobody has measured it).
"""
from __future__ import annotations

from typing import NamedTuple, Tuple


class Measurement(NamedTuple):
    device: str        # torch.cuda.get_device_name() of the GPU measured
    dtype: str         # "bfloat16", "float16", "float32"
    heads: int
    tokens: int        # N (queries = keys)
    head_dim: int
    mode: str          # "fwd" or "fwd+bwd"
    norm: str          # "batch-train", "batch-eval", "layer"
    backend: str       # "triton" or "cuda"
    batch: int
    speedup: float     # eager median time / the backend's, same inputs
    date: str
    commit: str


GPU_MEASUREMENTS: Tuple[Measurement, ...] = ()
