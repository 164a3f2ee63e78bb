"""The recorded scan of every Triton launch configuration (benchmarks/results/launch_scan.csv,
written by ``python -m benchmarks.launch_scan`` from sm_90 and sm_86 compiles) against today's rules.

No compiling here: the scan takes an hour or two on the CI machine. What is checked is that the
record still describes what the rules pick (a rule changed without a new scan fails), that every
recorded launch fits its GPU's shared memory and the rules' bound, and the spill guarantees.
"""
import csv
import os

import pytest

from reattn.kernels import launch

SCAN = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "launch_scan.csv")
KERNEL_OF_CALL = {"forward": ("forward",), "moments": ("forward",), "gram": ("gram",), "bn_sums": ("dq",),
                  "backward": ("dq", "dkdv")}


@pytest.fixture(scope="module")
def rows():
    with open(SCAN, newline="") as f:
        return list(csv.DictReader(f))


def _recorded(row) -> launch.TileConfig:
    return launch.TileConfig(HP=int(row["HP"]), G=int(row["G"]), BLOCK_M=int(row["BLOCK_M"]),
                             BLOCK_N=int(row["BLOCK_N"]), BLOCK_D=int(row["BLOCK_D"]), STATS_BLOCK_N=32,
                             num_warps=int(row["num_warps"]), num_stages=int(row["num_stages"]))


def _rule(row) -> launch.TileConfig:
    """What today's rules pick for the recorded call (head dims in the scan are multiples of 16)."""
    h, d, variant = int(row["h"]), int(row["d"]), row["variant"]
    variant = "plain" if variant == "batch" else variant
    args = dict(interpret=False, shared_limit=int(row["shared_limit"]), variant=variant)
    if row["kernel"] in ("forward", "gram"):
        return launch.forward_config(197, 197, d, h, **args)
    return launch.backward_config(197, 197, d, h, kernel=row["kernel"], **args)


def test_the_scan_covers_every_class_the_rules_distinguish(rows):
    from benchmarks.launch_scan import CALLS, CAPS, HEAD_DIMS, HEADS

    seen = {(int(r["cap"]), r["call"], r["variant"], int(r["h"]), int(r["d"])) for r in rows}
    for cap in CAPS:
        for h in HEADS:
            for d in HEAD_DIMS:
                for call, variants in CALLS.items():
                    for variant in variants:
                        assert (cap, call, variant, h, d) in seen, (cap, call, variant, h, d)


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
        bound = launch.shared_bytes(row["kernel"], _recorded(row), 2, masked=row["variant"] == "heavy")
        assert shared <= bound, (row, bound)


def test_no_spills_in_the_norm_modes_at_vit_head_dims(rows):
    """Without a mask or dropout, every norm mode (none, BatchNorm, LayerNorm) at head dims up to 64 and
    up to 8 slots (H <= 8) compiles without spilling: DeiT-S, DeepViT-16b's 12 heads have 16 slots, see
    the next test."""
    for row in rows:
        if row["variant"] != "heavy" and int(row["d"]) <= 64 and int(row["HP"]) == 8:
            assert int(row["spill_bytes"]) == 0, row


def test_the_remaining_spills_are_small_and_listed_in_the_readme(rows):
    """What still spills (masks or dropout, 16 and 32 slots at larger head dims, head-dim chunks)
    stays under 1 KiB per thread, in L1-resident local memory; README's Triton row says so."""
    for row in rows:
        assert int(row["spill_bytes"]) <= 1024, row
