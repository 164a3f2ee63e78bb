"""Compile every launch the Triton launch rules can pick, without a GPU, and record its resources.

For each class of problem the rules distinguish (slots HP with G row groups, the head dim's
power-of-two tile, the variant: "plain", "layer", "heavy"; see kernels/launch.py; "batch" is
training BatchNorm with given statistics, a "plain" launch with the norm folded in, and "eval" the
forward folding eval BatchNorm from the running statistics, another) and each entry
point (forward, backward, the Gram statistics sweep, the one-sweep moments, the BatchNorm
backward sums), the launches are captured and compiled for sm_90 exactly as the JIT would
(``kernels.aot.compile_call``), and again for sm_86 where its 101,376 B of shared memory make the
rules pick other tiles. The head counts ``HEADS`` cover every slot class and row-group count and the
counts the JIT specializes (1 head: a constant; 16 and 32: divisible by 16); the classes of
``EXTRA_CLASSES`` lie outside that grid (12 heads at D = 48, whose split forward and backward take the
head dim as tiles of 32 and 16 columns; 14 heads, the usual 16-slot kernels where 12 run the split
sweeps; head dims that fill their tile only partly, 48 and 80, at 8 and 16 slots). Every launch of
every class is recorded (a row per class and kernel, so the BatchNorm backward sums' SUMS_ONLY compile
is not taken for the backward's dq): registers, spill
bytes, shared memory, the shared-memory bound the rules assumed (``launch.shared_bytes``) and the
compile's cache key (``kernels.aot.launch_keys`` recomputes it: a record whose keys differ from
today's kernels is stale).

    python -m benchmarks.launch_scan [--out benchmarks/results/launch_scan.csv] [--quick]
                                     [--caps 90 86] [--heads 6 3 12 32 1 2 16 24 14] [--calls backward ...] [--merge]
                                     [--reuse]

takes ~80 min on a 2-core machine (1,870 launches; --quick: DeiT-S's class only), ~40 min as one process
per --caps. --caps / --heads / --calls scan a part; with --merge the rows of --out outside that part are kept
(two parts can run in parallel into two files and be concatenated). With --reuse a call whose compiles'
cache keys (``kernels.aot.launch_keys``, no compiling) are all the ones --out records keeps its rows: after
an edit only the kernels whose source (or a jit function they call) changed are compiled again. The
checked-in CSV is read by tests/kernels/test_launch_scan.py: no spills, every launch within its GPU's shared
memory and within the rules' bound, and the CSV covers every configuration today's rules pick.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

# (H, representative of its slot class), head dims (one per BLOCK_D class), the variants' arguments. Besides the
# slots HP and row groups G, the JIT specializes the head count itself (an integer argument of 1 becomes a
# constant, one divisible by 16 gets a divisibility hint), so 1, 16 and 32 heads compile apart from their
# classes' other counts: 6 (HP 8, G 1), 3 (G 2), 2 (G 4), 1 (G 8, H constant), 12 (HP 16: the split sweeps),
# 16 (HP 16, H divisible by 16: ViT-L), 24 and 32 (HP 32, without and with the hint).
HEADS = (6, 3, 12, 32, 1, 2, 16, 24)
HEAD_DIMS = (16, 32, 64, 128)
VARIANTS = {"plain": dict(norm="none", mask=False, dropout=False),
            "layer": dict(norm="layer", mask=False, dropout=False),
            "batch": dict(norm="batch", mask=False, dropout=False),
            "eval": dict(norm="batch-eval", mask=False, dropout=False),
            "heavy": dict(norm="layer", mask=True, dropout=True)}
# entry point -> the variants that differ for it
CALLS = {"forward": ("plain", "batch", "eval", "layer", "heavy"), "backward": ("plain", "batch", "layer", "heavy"),
         "gram": ("plain", "heavy"), "moments": ("plain", "heavy"), "bn_grad_sums": ("plain", "heavy")}
CAPS = (90, 86)
# Classes outside HEADS x HEAD_DIMS, with the calls they differ for: 12 heads at a head dim of 48, the forward's
# and the backward's split sweeps over a head-dim tile and a tail (32 + 16 columns; launch.head_dim_tail); 14
# heads, where 12 run the split sweeps (the forward reading the statistics and the moments up to D = 64, the
# backward at 32 and 64), the usual 16-slot kernels without the divisibility hint 16 heads get; and head dims
# that fill their tile only partly (EVEN_D False: 48 in a tile of 64, 80 in the rule's tiles for 128) at 8 and
# 16 slots (at 32 slots every head dim runs in tiles of 16, whole).
EXTRA_CLASSES = ((12, 48, ("forward", "backward")),
                 *((14, d, ("forward", "backward", "moments")) for d in (16, 32, 64)),
                 *((h, d, tuple(CALLS)) for h in (6, 16) for d in (48, 80)))
# Every head count the scan compiles: HEADS' grid and the extra classes' own.
SCANNED_HEADS = tuple(dict.fromkeys(HEADS + tuple(h for h, _, _ in EXTRA_CLASSES)))
FIELDS = ["cap", "call", "variant", "h", "d", "kernel", "HP", "G", "BLOCK_M", "BLOCK_N", "BLOCK_D", "D_CHUNKS",
          "num_warps", "num_stages", "shared", "shared_bound", "shared_limit", "registers", "spill_bytes", "cache_key"]


def arguments(call: str, variant: str) -> dict:
    args = dict(VARIANTS[variant])
    if call in ("gram", "moments"):
        args["norm"] = "none"
    if call == "bn_grad_sums":
        args["norm"] = "batch"
    return args


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "launch_scan.csv"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--caps", type=int, nargs="+", default=list(CAPS), help="compute capabilities (90 86)")
    parser.add_argument("--heads", type=int, nargs="+", default=list(SCANNED_HEADS),
                        help="head counts (6 3 12 32 1 2 16 24 14: HEADS' grid, and the EXTRA_CLASSES of those heads)")
    parser.add_argument("--calls", nargs="+", default=list(CALLS), choices=list(CALLS),
                        help="entry points (every one); with --merge, rescan only the kernels a change touched")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of --out outside --caps x --heads x --calls")
    parser.add_argument("--reuse", action="store_true",
                        help="take a call's rows from --out where their cache keys are today's (no compile)")
    opts = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ.pop("TRITON_INTERPRET", None)
    from reattn.kernels import launch
    from reattn.kernels.aot import ELEMENT_SIZE, SHARED_MEMORY_LIMIT, compile_call, launch_keys

    heads, dims = ((6,), (64,)) if opts.quick else (tuple(opts.heads), HEAD_DIMS)
    existing = []
    if (opts.merge or opts.reuse) and os.path.exists(opts.out):
        with open(opts.out, newline="") as f:
            existing = list(csv.DictReader(f))
    scanned = {(c, h, call) for c in opts.caps for h in heads for call in opts.calls}
    kept = [r for r in existing if (int(r["cap"]), int(r["h"]), r["call"]) not in scanned] if opts.merge else []
    # --reuse: the record's rows per (cap, call, variant, h, d), in launch order, to copy where today's keys match
    recorded = {}
    for r in existing if opts.reuse else ():
        recorded.setdefault((int(r["cap"]), r["call"], r["variant"], int(r["h"]), int(r["d"])), []).append(r)
    os.makedirs(os.path.dirname(opts.out) or ".", exist_ok=True)
    with open(opts.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(kept)
        classes = [(h, d, tuple(opts.calls)) for h in heads if h in HEADS or opts.quick for d in dims]
        if not opts.quick:
            classes += [(h, d, tuple(c for c in calls if c in opts.calls)) for h, d, calls in EXTRA_CLASSES
                        if h in heads]
        for cap in opts.caps:
            for h, d, calls in classes:
                for call in calls:
                    for variant in CALLS[call]:
                        args = arguments(call, variant)
                        start = time.time()
                        old = recorded.get((cap, call, variant, h, d))
                        if old and [r["cache_key"] for r in old] == launch_keys(call, h, d, 197, cap, **args):
                            writer.writerows(old)
                            f.flush()
                            print(f"{time.time() - start:5.0f}s reused", cap, call, variant, h, d, flush=True)
                            continue
                        for r in compile_call(call, h, d, 197, cap, **args):
                            name = r["kernel"].replace("_re_attention_", "").replace("_kernel", "").strip("_")
                            kernel = {"fwd": "forward", "bwd_dq": "dq", "bwd_dkdv": "dkdv"}.get(name, name)
                            cfg = launch.TileConfig(HP=r["HP"], G=r["G"], BLOCK_M=r["BLOCK_M"],
                                                    BLOCK_N=r["BLOCK_N"], BLOCK_D=r["BLOCK_D"],
                                                    STATS_BLOCK_N=r.get("STATS_BLOCK_N", 16),
                                                    num_warps=r["num_warps"], num_stages=r["num_stages"])
                            row = dict(cap=cap, call=call, variant=variant, h=h, d=d, kernel=kernel,
                                       shared_bound=launch.shared_bytes(
                                           kernel, cfg, ELEMENT_SIZE["bf16"], masked=args["mask"],
                                           split_heads=call == "backward" and launch.splits_backward_heads(
                                               h, d, norm=args["norm"], masked=args["mask"],
                                               has_dropout=args["dropout"], element_size=2, kernel=kernel,
                                               interpret=False),
                                           d_tail=launch.head_dim_tail(d)),
                                       shared_limit=SHARED_MEMORY_LIMIT[cap],
                                       **{k: r[k] for k in FIELDS if k in r and k not in
                                          ("cap", "call", "h", "d", "kernel")})
                            writer.writerow(row)
                            f.flush()
                            print(f"{time.time() - start:5.0f}s", row, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] if len(sys.argv) > 1 else None)
