"""What the tests expect of the build of reattn._C."""
from __future__ import annotations

import os
from typing import List

DEFAULT_CUDA_ARCHS = "80;90"  # setup.py's default for REATTN_CUDA_ARCHS


def expected_cuda_archs() -> List[str]:
    """The compute capabilities the CUDA part of reattn._C is expected to be built for, as setup.py reads them:
    REATTN_CUDA_ARCHS (';' or ',' separated, "8.0" or "80") when set in the test's environment, else the default
    80 and 90; sorted, without repeats (build_info()["cuda_archs"] is ",".join of this list).

    A build for other archs (e.g. REATTN_CUDA_ARCHS=90 for one GPU) is tested by running pytest with the same
    REATTN_CUDA_ARCHS."""
    raw = os.environ.get("REATTN_CUDA_ARCHS", "").strip() or DEFAULT_CUDA_ARCHS
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    return sorted(set(archs), key=int)
