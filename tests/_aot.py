"""Ahead-of-time compiles of every Triton kernel for sm_80, sm_86 and sm_90, run in a background process.

The compiles take ~10 s each on the 2-core CI machine, so ``tests/conftest.py`` starts them when
``tests/kernels/test_aot.py`` is collected and the interpreter tests run meanwhile; the tests
in test_aot.py then read the results. Configs are the ones the launch heuristics pick for the
model shapes of issue 3; each kernel is compiled in its heaviest variant (bool mask, dropout,
mix bias and an affine norm).
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (H, D, N): DeiT-S, DeepViT-16b, DeepViT-L at 384 px, and a long sequence with head dim 128.
SHAPES = [(6, 64, 197), (12, 32, 197), (12, 35, 577), (16, 128, 4096)]
CAPS = (80, 90)


def jobs():
    result = []
    for cap in CAPS:
        for h, d, n in SHAPES:
            shape = dict(h=h, d=d, n=n, cap=cap)
            result.append(dict(kernel="forward", norm="layer", **shape))
            result.append(dict(kernel="bn_stats", norm="batch", **shape))
            result.append(dict(kernel="backward", norm="batch" if cap == 80 else "layer", **shape))
    # The forward with training BatchNorm's per-program sums (one-sweep BatchNorm), the heaviest shapes.
    result.append(dict(kernel="forward", h=12, d=35, n=577, cap=90, norm="none", moments=True))
    result.append(dict(kernel="forward", h=16, d=128, n=4096, cap=80, norm="none", moments=True))
    # Head-dim chunks where the whole head dim does not fit (kernels/launch.py): the backward at 32 heads
    # and D = 128 on sm_90 and D = 64 on sm_80; DeiT-S training and D = 128 on sm_86 (RTX 3090, A10;
    # 101,376 B per block, as sm_89's RTX 4090, L4, L40S). The forward and the statistics sweep at 32
    # heads and D = 128 fit no GPU as real launches (the rule refuses them: test_gpu_generations.py).
    result.append(dict(kernel="backward", h=32, d=128, n=197, cap=90, norm="batch"))
    result.append(dict(kernel="backward", h=32, d=64, n=197, cap=80, norm="layer"))
    result.append(dict(kernel="backward", h=6, d=64, n=197, cap=86, norm="layer"))
    for kernel, norm in (("forward", "layer"), ("bn_stats", "batch")):
        result.append(dict(kernel=kernel, h=16, d=128, n=4096, cap=86, norm=norm))
    # The exact-fp32 (no tensor core) path, plain: no mask, no dropout, no norm.
    result.append(dict(kernel="forward", h=12, d=32, n=197, cap=90, dtype="fp32", norm="none", mask=False,
                       dropout=False))
    return result


_process = None


def start():
    """Start compiling in the background (idempotent)."""
    global _process
    if _process is None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter has no compiler
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        _process = subprocess.Popen([sys.executable, "-m", "reattn.kernels.aot", json.dumps(jobs())], cwd=REPO,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _process


_results = None


def results(timeout=1800):
    """(returncode, [result dicts], stderr tail) of the background compiles, waiting for them."""
    global _results
    if _results is None:
        out, err = start().communicate(timeout=timeout)
        parsed = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("AOT ")]
        _results = (_process.returncode, parsed, err[-4000:])
    return _results
