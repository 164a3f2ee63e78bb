"""Triton kernels of reattn, installed as ``reattn.kernels``.

Pure ``@triton.jit`` code and launch heuristics; nothing here imports ``reattn`` (data flows
down: reattn -> kernels). The fused forward/backward kernels land with the Triton backend.
"""
