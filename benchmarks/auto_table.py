"""Generate ``reattn/backends/measured.py`` (what ``backend="auto"`` trusts on GPUs) from the benchmark CSV.

    python -m benchmarks.auto_table            # rewrite reattn/backends/measured.py
    python -m benchmarks.auto_table --check    # exit 1 if it differs from what the CSV gives

Every GPU row of benchmarks/results/microbench.csv (``device_type == "cuda"``, status ok) of a fused
backend (triton, cuda) becomes a ``Measurement``: GPU, dtype, H, N, D, mode, norm, batch and the
speed-up over the eager official core measured on the same inputs. The latest row wins where one
regime was measured more than once. Rows of the static model (benchmarks/results/static_model.csv)
are predictions and never enter this table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Sequence

from benchmarks import common

TABLE = common.REPO_ROOT / "reattn" / "backends" / "measured.py"
CSV = common.RESULTS_DIR / "microbench.csv"
FUSED = ("triton", "cuda")
_BEGIN = "GPU_MEASUREMENTS: Tuple[Measurement, ...] = "


def measurements(rows: Sequence[Dict[str, str]]) -> List[tuple]:
    latest: Dict[tuple, Dict[str, str]] = {}
    for row in rows:
        if row.get("device_type") != "cuda" or row.get("status", "ok") not in ("ok", "") or \
                row.get("provider") not in FUSED or not row.get("speedup_vs_eager"):
            continue
        key = (row["device"], row["dtype"], int(row["H"]), int(row["N"]), int(row["D"]), row["mode"], row["norm"],
               row["provider"])
        if key not in latest or row["date"] > latest[key]["date"]:
            latest[key] = row
    out = []
    for key in sorted(latest):
        row = latest[key]
        out.append(key + (int(row["batch"]), round(float(row["speedup_vs_eager"]), 3), row["date"], row["commit"]))
    return out


def render(rows: List[tuple]) -> str:
    text = TABLE.read_text()
    head = text[:text.index(_BEGIN)]
    if not rows:
        return head + _BEGIN + "()\n"
    lines = [_BEGIN + "("]
    for r in rows:
        lines.append(f"    Measurement(device={r[0]!r}, dtype={r[1]!r}, heads={r[2]}, tokens={r[3]}, head_dim={r[4]}, "
                     f"mode={r[5]!r}, norm={r[6]!r}, backend={r[7]!r}, batch={r[8]}, speedup={r[9]}, date={r[10]!r}, "
                     f"commit={r[11]!r}),")
    lines.append(")")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.auto_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the table differs from the CSV's")
    parser.add_argument("--csv", type=Path, default=CSV)
    args = parser.parse_args(argv)
    rows = common.read_csv(args.csv) if args.csv.exists() else []
    text = render(measurements(rows))
    if args.check:
        same = TABLE.read_text() == text
        print("reattn/backends/measured.py matches the CSV" if same else
              "reattn/backends/measured.py is stale: run python -m benchmarks.auto_table")
        return 0 if same else 1
    TABLE.write_text(text)
    print(f"wrote {TABLE} ({len(measurements(rows))} GPU measurements)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
