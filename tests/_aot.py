"""Ahead-of-time compiles of every Triton launch for sm_80, sm_86 and sm_90, run in two background processes.

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
    """A sample of what CI can afford (~40 launches): every entry point, both ends of the variants, the
    shapes whose tiles differ, and each GPU's shared memory where it binds. The whole table is
    compiled by ``python -m benchmarks.launch_scan`` (its CSV is checked in tests/kernels/test_launch.py)."""
    result = []
    # sm_90: DeiT-S, DeepViT-L at 384 px (D = 35 runs padded to 48), 32 heads at D = 128.
    for h, d, n in ((6, 64, 197), (12, 35, 577), (32, 128, 197)):
        for variant in (PLAIN, HEAVY):
            result.append(dict(call="forward", h=h, d=d, n=n, cap=90, **variant))
            result.append(dict(call="backward", h=h, d=d, n=n, cap=90, **variant))
    # training BatchNorm: the statistics sweep, the one-sweep moments, the forward with given
    # statistics and the backward's sums, with mask and dropout
    for h, d, n in ((6, 64, 197), (32, 128, 197)):
        result.append(dict(call="gram", h=h, d=d, n=n, cap=90, **TRAIN_BN))
        result.append(dict(call="moments", h=h, d=d, n=n, cap=90, **TRAIN_BN))
        result.append(dict(call="forward", h=h, d=d, n=n, cap=90, norm="batch", mask=True, dropout=True))
        result.append(dict(call="bn_grad_sums", h=h, d=d, n=n, cap=90, norm="batch", mask=True, dropout=True))
    # sm_86 (101,376 B per block: RTX 3090/4090, A10, L4, L40S) and sm_80 where the rules pick
    # smaller tiles than on sm_90.
    for cap in (86, 80):
        result.append(dict(call="forward", h=32, d=128, n=197, cap=cap, **HEAVY))
        result.append(dict(call="backward", h=32, d=128, n=197, cap=cap, **HEAVY))
    result.append(dict(call="backward", h=6, d=64, n=197, cap=86, **HEAVY))
    # The exact-fp32 path (CUDA-core products).
    for variant in (PLAIN, HEAVY):
        result.append(dict(call="forward", h=32, d=128, n=197, cap=80, dtype="fp32", **variant))
        result.append(dict(call="backward", h=12, d=32, n=197, cap=90, dtype="fp32", **variant))
    return result


def _parse(returncode, out, err):
    """(returncode, [result dicts], stderr tail) of the compiles."""
    return returncode, [json.loads(line[4:]) for line in out.splitlines() if line.startswith("AOT ")], err


# The compiles are single-threaded and take ~450 CPU-s from an empty Triton cache (any kernel change empties
# it for the launches it touches): two processes, so that the end of the session, when the tests are done and
# wait for them, keeps both cores busy. Each gets about half the work (a backward compiles two kernels).
PROCESSES = 2
_JOBS = None


def _weight(job: dict) -> int:
    return (2 if job["call"] == "backward" else 1) * (3 if job.get("dtype") == "fp32" else 1)


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
