"""Ahead-of-time compiles of a sample of the Triton launches for sm_80 and sm_90, run in two background processes.

Each job is one entry point of the kernels (``kernels.aot.compile_call``: the launches it makes
are captured and compiled exactly as the JIT would compile them on that GPU). The compiles take
~10 s each on the 2-core CI machine, so ``tests/conftest.py`` starts them when
``tests/kernels/test_aot.py`` is collected and the interpreter tests run meanwhile; the tests in
test_aot.py then read the results.
"""
import json

# The two ends of what a launch rule distinguishes: plain (no mask, no dropout, no norm: the
# inference path) and heavy (bool mask, dropout, LayerNorm: the most live state).
PLAIN = dict(norm="none", mask=False, dropout=False)
HEAVY = dict(norm="layer", mask=True, dropout=True)
TRAIN_BN = dict(norm="none", mask=True, dropout=True)


def jobs():
    """What the launch scan's record cannot vouch for, and a reproduction of it (17 launches; the compile times
    measured from an empty Triton cache are in ``_weight``).

    The scan (``python -m benchmarks.launch_scan``, benchmarks/results/launch_scan.csv) compiles every
    configuration the rules pick for sm_90 and sm_86 in bf16 at the power-of-two head dims, and
    tests/kernels/test_launch_scan.py checks it against today's rules and kernels without compiling. Compiled
    here: DeiT-S's plain forward and backward and its Gram sweep on sm_90, compared with the scan's rows (the
    record reproduces); DeepViT-L at 384 px (D = 35, run padded to 48: a head-dim tile with masked columns,
    which the scan's head dims do not have); sm_80 (not scanned) at the largest shape with the most live
    state, and its plain forward at D = 128 (the softmax statistics kernel's largest tile); the exact-fp32 path
    (CUDA-core products), at its largest spill and at sm_80."""
    result = []
    for call in ("forward", "backward"):
        result.append(dict(call=call, h=6, d=64, n=197, cap=90, **PLAIN))
        result.append(dict(call=call, h=12, d=35, n=577, cap=90, **PLAIN))
        result.append(dict(call=call, h=32, d=128, n=197, cap=80, **HEAVY))
    result.append(dict(call="forward", h=12, d=128, n=197, cap=80, **PLAIN))  # the statistics kernel on sm_80
    result.append(dict(call="gram", h=6, d=64, n=197, cap=90, **TRAIN_BN))
    result.append(dict(call="forward", h=32, d=128, n=197, cap=80, dtype="fp32", **HEAVY))
    result.append(dict(call="backward", h=12, d=32, n=197, cap=90, dtype="fp32", **PLAIN))
    return result


def scanned_variant(result: dict):
    """The launch scan's variant of a compiled launch (``benchmarks.launch_scan``: its GPUs, head counts, head
    dims, N = 197, bf16, and the norm, mask and dropout of one of its variants), or None where the scan has no
    such launch."""
    from benchmarks.launch_scan import CALLS, CAPS, HEAD_DIMS, HEADS, arguments

    if (result["cap"] not in CAPS or result["h"] not in HEADS or result["d"] not in HEAD_DIMS or result["n"] != 197
            or result.get("dtype", "bf16") != "bf16"):
        return None
    given = {k: result[k] for k in ("norm", "mask", "dropout")}
    return next((v for v in CALLS.get(result["call"], ()) if arguments(result["call"], v) == given), None)


def _parse(returncode, out, err):
    """(returncode, [result dicts], stderr tail) of the compiles."""
    return returncode, [json.loads(line[4:]) for line in out.splitlines() if line.startswith("AOT ")], err


# The compiles are single-threaded and take minutes from an empty Triton cache (``_weight``; any kernel change empties
# it for the launches it touches): two processes, so that the end of the session, when the tests are done and
# wait for them, keeps both cores busy. Each gets about half the work (``_weight``).
PROCESSES = 2
_JOBS = None


def _weight(job: dict) -> int:
    """About a job's compile time, in units of a plain forward's (~2.5 s on an idle core of the dev machine):
    a backward compiles two kernels; 32 slots with LayerNorm, a mask and dropout raise the register pressure
    ptxas works against ~4x, and fp32 (CUDA-core products over tiles twice as wide) ~2x. Measured from an empty
    Triton cache, two at a time: sm_80's bf16 backward at 32 heads with all of them 31 s, its fp32 forward
    28 s, the fp32 backward at 12 heads 12 s, the bf16 forward at 32 heads 10 s, every other job 1.6-4 s."""
    heavy = job["h"] == 32 and job["norm"] == "layer" and job["mask"] and job["dropout"]
    return (2 if job["call"] == "backward" else 1) * (4 if heavy else 1) * (2 if job.get("dtype") == "fp32" else 1)


def parts(n: int = PROCESSES) -> list:
    """``jobs()`` split into ``n`` lists of about equal weight (heaviest first, each to the lightest list)."""
    lists, weights = [[] for _ in range(n)], [0] * n
    for job in sorted(jobs(), key=_weight, reverse=True):
        i = weights.index(min(weights))
        lists[i].append(job)
        weights[i] += _weight(job)
    return lists


def _jobs():
    global _JOBS
    if _JOBS is None:
        from tests._background import Background

        _JOBS = [Background("reattn.kernels.aot", json.dumps(part), parse=_parse, name=f"aot-{i}")
                 for i, part in enumerate(parts())]
    return _JOBS


def start():
    """Start compiling in the background (idempotent), outside Triton's interpreter (it has no compiler)."""
    for job in _jobs():
        job.start()


def results(timeout=3000):
    """(returncode, [result dicts], stderr tail) of the background compiles, waiting for them."""
    outcomes = [job.results(timeout) for job in _jobs()]
    return (max(rc for rc, _, _ in outcomes), [r for _, results, _ in outcomes for r in results],
            "\n".join(err for _, _, err in outcomes if err))
