"""benchmarks/launch_scan.py itself (its record, benchmarks/results/launch_scan.csv, is checked against today's rules
and kernels by tests/kernels/test_launch_scan.py)."""
import pytest


def test_a_rescan_reuses_the_rows_whose_keys_are_todays(tmp_path):
    """``launch_scan --reuse`` copies a call's recorded rows where today's cache keys are the record's (no
    compiling) and compiles the rest: DeiT-S's class on sm_90 with one recorded key made stale, that call alone
    compiled again (its row back with today's key), every other reused, row for row the record's."""
    import csv
    import os
    import subprocess
    import sys

    import triton

    from benchmarks.launch_scan import CALLS
    from tests.kernels.known_spills import recorded_rows

    if triton.__version__ != "3.9.0":
        pytest.skip(f"the scan was compiled with Triton 3.9.0; this is {triton.__version__} (other keys)")
    deit = [r for r in recorded_rows() if (r["cap"], r["h"], r["d"]) == ("90", "6", "64")]
    stale = next(i for i, r in enumerate(deit) if (r["call"], r["variant"]) == ("bn_grad_sums", "plain"))
    record = tmp_path / "scan.csv"
    with open(record, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(deit[0]))
        writer.writeheader()
        writer.writerows(dict(r, cache_key="0" * 32) if i == stale else r for i, r in enumerate(deit))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    done = subprocess.run([sys.executable, "-m", "benchmarks.launch_scan", "--quick", "--caps", "90", "--reuse",
                           "--out", str(record)], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    reused = [line for line in done.stdout.splitlines() if " reused " in line]
    assert len(reused) == sum(len(variants) for variants in CALLS.values()) - 1
    assert not any(" bn_grad_sums plain " in line for line in reused)
    with open(record, newline="") as f:
        assert list(csv.DictReader(f)) == deit
