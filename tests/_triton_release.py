"""The kernels compiled for sm_90 by the GPU machines' Triton release, installed beside the project's own, in a
background process (tests/kernels/test_triton_release.py asserts on its output).

The project's environment has the newest Triton (3.9, with torch 2.15); the GPU machines lent to some sessions
run torch 2.11 with triton 3.6 and no package index (benchmarks/gpu_session.sh), so a kernel that compiles with
3.9 alone would fail there only, after minutes of a session's few minutes of device time. Here triton==3.6.0 is
pip-installed with ``--no-deps --target`` into a cache directory (``$REATTN_TRITON_CACHE``, default
``~/.cache/reattn-triton``; a 188 MB wheel, reused between runs), put first on this process's ``sys.path``
before anything imports triton, and ``reattn.kernels.aot`` compiles the launches of ``jobs()`` as that
release's JIT would (importing ``reattn`` under it too). Run as ``python -m tests._triton_release``: one
``TRITON {json}`` line (the version and file imported), then ``AOT {json}`` lines as ``kernels.aot`` prints them.
"""
import json
import os
import sys
from pathlib import Path

from tests import _side_install

VERSION = "3.6.0"
CACHE = Path(os.environ.get("REATTN_TRITON_CACHE") or Path.home() / ".cache" / "reattn-triton")


def jobs() -> list:
    """What a GPU session runs (benchmarks/gpu_session.sh: its correctness checks and timings), sm_90, bf16:
    DeiT-S (8 slots) and ViT-B (12 heads: the split sweeps) in every norm mode, forward (norm none, LayerNorm,
    eval BatchNorm folded), training BatchNorm's one-sweep forward ("moments") and backward (none, LayerNorm,
    training BatchNorm); DeepViT-16b's backward where a head dim of 32 splits it (LayerNorm, training BatchNorm);
    DeepViT-L-384's head dim of 35 (tiles of 32 + 16 columns); a mask and dropout with LayerNorm at DeiT-S; the
    Gram sweep and the backward's BatchNorm sums."""
    plain = dict(mask=False, dropout=False)
    result = []
    for h, d in ((6, 64), (12, 64)):
        result += [dict(call="forward", h=h, d=d, n=197, cap=90, norm=norm, **plain)
                   for norm in ("none", "layer", "batch-eval")]
        result.append(dict(call="moments", h=h, d=d, n=197, cap=90, norm="none", **plain))
        result += [dict(call="backward", h=h, d=d, n=197, cap=90, norm=norm, **plain)
                   for norm in ("none", "layer", "batch")]
    result += [dict(call="backward", h=12, d=32, n=197, cap=90, norm=norm, **plain) for norm in ("layer", "batch")]
    result += [dict(call=call, h=12, d=35, n=577, cap=90, norm="none", **plain) for call in ("forward", "backward")]
    result += [dict(call=call, h=6, d=64, n=197, cap=90, norm="layer", mask=True, dropout=True)
               for call in ("forward", "backward")]
    result.append(dict(call="gram", h=6, d=64, n=197, cap=90, norm="none", mask=True, dropout=True))
    result.append(dict(call="bn_grad_sums", h=6, d=64, n=197, cap=90, norm="batch", **plain))
    return result


def install() -> Path:
    """triton==VERSION in CACHE/VERSION (``tests._side_install``; the wheel is 188 MB)."""
    return _side_install.install(CACHE, "triton", VERSION, timeout=1200)


def _parse(returncode, out, err):
    """(returncode, the TRITON line's dict or None, [AOT result dicts], stderr tail)."""
    lines = out.splitlines()
    version = next((json.loads(line[7:]) for line in lines if line.startswith("TRITON ")), None)
    return returncode, version, [json.loads(line[4:]) for line in lines if line.startswith("AOT ")], err


_JOB = None


def _job():
    global _JOB
    if _JOB is None:
        from tests._background import Background

        _JOB = Background("tests._triton_release", parse=_parse, name=f"triton-{VERSION}")
    return _JOB


def start():
    """Install and compile in the background (idempotent), outside Triton's interpreter."""
    _job().start()


def results(timeout=3000):
    """(returncode, {"version", "file"} of the Triton imported, [AOT result dicts], stderr tail), waiting."""
    return _job().results(timeout)


def main() -> None:
    if "triton" in sys.modules:
        raise SystemExit("tests._triton_release: triton was imported before the release's path was put first")
    sys.path.insert(0, str(install()))
    import triton

    print("TRITON " + json.dumps(dict(version=triton.__version__, file=triton.__file__)), flush=True)
    from reattn.kernels import aot

    aot.main([json.dumps(jobs())])


if __name__ == "__main__":
    main()
