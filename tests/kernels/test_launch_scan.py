"""The recorded scan of every Triton launch configuration (benchmarks/results/launch_scan.csv,
written by ``python -m benchmarks.launch_scan`` from sm_90 and sm_86 compiles) against today's rules.

No compiling here: the scan takes an hour or two on the CI machine. What is checked is that the
record still describes what the rules pick (a rule changed without a new scan fails), that every
recorded launch fits its GPU's shared memory and the rules' bound, and the spill guarantees.
"""
import pytest

from reattn.kernels import launch
from tests.kernels.known_spills import KNOWN_SPILLS, case_of, recorded_rows, spill_class, spill_reason


@pytest.fixture(scope="module")
def rows():
    return recorded_rows()


def _recorded(row) -> launch.TileConfig:
    return launch.TileConfig(HP=int(row["HP"]), G=int(row["G"]), BLOCK_M=int(row["BLOCK_M"]),
                             BLOCK_N=int(row["BLOCK_N"]), BLOCK_D=int(row["BLOCK_D"]), STATS_BLOCK_N=32,
                             num_warps=int(row["num_warps"]), num_stages=int(row["num_stages"]))


def _rule(row) -> launch.TileConfig:
    """What today's rules pick for the recorded call (head dims in the scan are multiples of 16)."""
    h, d, variant = int(row["h"]), int(row["d"]), row["variant"]
    variant = "plain" if variant in ("batch", "eval") else variant
    args = dict(interpret=False, shared_limit=int(row["shared_limit"]), variant=variant)
    if row["kernel"] == "softmax_stats":
        return launch.softmax_stats_config(d, interpret=False)
    if row["kernel"] == "forward":  # the scan's calls have scale 0.125
        moments = row["call"] == "moments"
        given = launch.splits_softmax_stats(variant, 2, 0.125, h, d, moments)
        return launch.forward_config(197, 197, d, h, stats_given=given, moments=moments, **args)
    if row["kernel"] == "gram":
        return launch.forward_config(197, 197, d, h, **args)
    return launch.backward_config(197, 197, d, h, kernel=row["kernel"], split_heads=_splits_heads(row), **args)


def _splits_heads(row) -> bool:
    """Whether the recorded call's backward takes the split sweeps (``launch.splits_backward_heads``)."""
    from benchmarks.launch_scan import arguments

    call = arguments(row["call"], row["variant"])
    return row["call"] == "backward" and launch.splits_backward_heads(
        int(row["h"]), int(row["d"]), norm=call["norm"], masked=call["mask"], has_dropout=call["dropout"],
        element_size=2, kernel=row["kernel"], interpret=False)


def test_the_scan_covers_every_class_the_rules_distinguish(rows):
    from benchmarks.launch_scan import CALLS, CAPS, EXTRA_CLASSES, HEAD_DIMS, HEADS

    seen = {(int(r["cap"]), r["call"], r["variant"], int(r["h"]), int(r["d"])) for r in rows}
    classes = [(h, d, tuple(CALLS)) for h in HEADS for d in HEAD_DIMS] + list(EXTRA_CLASSES)
    for cap in CAPS:
        for h, d, calls in classes:
            for call in calls:
                for variant in CALLS[call]:
                    assert (cap, call, variant, h, d) in seen, (cap, call, variant, h, d)
    # every head dim the split forward and backward take in two tiles has a class (launch.head_dim_tail)
    assert {d for d in range(16, 65, 16) if launch.head_dim_tail(d)} == {d for h, d, _ in EXTRA_CLASSES if h == 12}
    assert all({"forward", "backward"} <= set(calls) for h, d, calls in EXTRA_CLASSES if h == 12)


def test_the_record_is_what_todays_rules_pick(rows):
    for row in rows:
        cfg = _recorded(row)
        rule = _rule(row)
        assert (cfg.HP, cfg.G, cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_D, cfg.num_warps, cfg.num_stages) == (
            rule.HP, rule.G, rule.BLOCK_M, rule.BLOCK_N, rule.BLOCK_D, rule.num_warps, rule.num_stages), (
            "rerun python -m benchmarks.launch_scan", row, rule)


def test_every_recorded_launch_fits_its_gpu_and_the_rules_bound(rows):
    for row in rows:
        shared = int(row["shared"])
        assert shared <= int(row["shared_limit"]), row
        bound = launch.shared_bytes(row["kernel"], _recorded(row), 2, masked=row["variant"] == "heavy",
                                    split_heads=_splits_heads(row), d_tail=launch.head_dim_tail(int(row["d"])))
        assert shared <= bound, (row, bound)


# Training BatchNorm's backward at 8 slots holds its operands in registers as the other modes do
# (kernels/backward.py: Q_HELD, K_PRODUCT, Q_PRODUCT), which the static model predicts makes its DeiT-S
# kernels ~28% faster; at D = 64 that spills this much per thread (dQ; dK/dV 8 B), and no more.
BATCH_BACKWARD_D64_SPILL = 24


def test_no_spills_in_the_norm_modes_at_up_to_eight_heads(rows):
    """Without a mask or dropout, every norm mode (none, BatchNorm, LayerNorm) at 5 to 8 heads (8 slots,
    one batch row per program: DeiT-S) and head dims up to 64 that fill their tile (16, 32, 64) compiles
    without spilling, but training BatchNorm's backward at D = 64 (at most BATCH_BACKWARD_D64_SPILL bytes per
    thread). A head dim of 48 (a tile of 64 with its last 16 columns masked) spills 8-16 B in the LayerNorm
    forward, the moments and training BatchNorm's dK/dV: known spills, tests/kernels/known_spills.py."""
    for row in rows:
        d = int(row["d"])
        if (row["variant"] != "heavy" and d <= 64 and launch.padded_head_dim(d) == d and int(row["HP"]) == 8
                and int(row["G"]) == 1):
            if (row["variant"], row["call"], row["d"]) == ("batch", "backward", "64"):
                assert int(row["spill_bytes"]) <= BATCH_BACKWARD_D64_SPILL, row
            else:
                assert int(row["spill_bytes"]) == 0, row


def _no_spill_cases():
    """Every recorded launch, the known spills among them expected to fail (strictly: one that stops
    spilling passes, which fails the run until its entry leaves KNOWN_SPILLS)."""
    cases = []
    for row in recorded_rows():
        case = case_of(row)
        marks = ()
        if case in KNOWN_SPILLS:
            reason = spill_reason(spill_class(row["HP"], row["variant"] == "heavy", row["d"]))
            marks = pytest.mark.xfail(strict=True, reason=f"spills {KNOWN_SPILLS[case]} B per thread: {reason}")
        cases.append(pytest.param(row, id=case, marks=marks))
    return cases


@pytest.mark.parametrize("row", _no_spill_cases())
def test_no_launch_spills(row):
    assert int(row["spill_bytes"]) == 0, row


def test_each_known_spill_is_what_the_record_spills(rows):
    """An entry of KNOWN_SPILLS is the record's bytes, not slack: a case that spills more fails (its
    expected failure would hide it), one that spills less fails until its entry comes down (so every
    improvement becomes a requirement), and an entry whose launch the record lacks is stale."""
    recorded = {case_of(row): int(row["spill_bytes"]) for row in rows}
    for case, known in KNOWN_SPILLS.items():
        assert case in recorded, ("stale entry of KNOWN_SPILLS", case)
        assert recorded[case] == known, ("update tests/kernels/known_spills.py", case, recorded[case], known)


def test_the_record_was_compiled_from_todays_kernels(rows):
    """The compiles' cache keys (kernel source, constants, launch options, Triton version, target) of
    DeiT-S's class (6 heads, D = 64) on sm_90 are what today's kernels give (``aot.launch_keys``,
    no compiling; in a process outside Triton's interpreter, as the scan ran): a kernel edited since
    the scan fails here until the scan is rerun."""
    import json
    import os
    import subprocess
    import sys

    import triton

    if triton.__version__ != "3.9.0":
        pytest.skip(f"the scan was compiled with Triton 3.9.0; this is {triton.__version__} (other keys)")
    script = (
        "import json\n"
        "from benchmarks.launch_scan import CALLS, arguments\n"
        "from reattn.kernels.aot import launch_keys\n"
        "print(json.dumps({f'{c} {v}': launch_keys(c, 6, 64, 197, 90, **arguments(c, v))\n"
        "                  for c, vs in CALLS.items() for v in vs}))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # as benchmarks.launch_scan compiles
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    today = json.loads(done.stdout.strip().splitlines()[-1])
    for name, keys in today.items():
        call, variant = name.split()
        recorded = [r["cache_key"] for r in rows
                    if (r["cap"], r["call"], r["variant"], r["h"], r["d"]) == ("90", call, variant, "6", "64")]
        assert recorded == keys, ("rerun python -m benchmarks.launch_scan", call, variant)
