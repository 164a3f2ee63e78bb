"""Access to the compiled extension ``reattn._C``, which may be missing (the eager path never needs it),
and the environment switch of its host emulator."""
from __future__ import annotations

import os
from typing import Optional

try:
    from reattn import _C  # type: ignore[attr-defined]

    EXTENSION_ERROR: Optional[BaseException] = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    EXTENSION_ERROR = error

# Read once at import: the backend choice consults it inside torch.compile'd code, where dynamo cannot
# trace a pybind11 function (a graph break, or an error under fullgraph=True), but reads a global dict.
BUILD_INFO: dict = dict(_C.build_info()) if _C is not None else {}

REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -e .` in an environment that has torch"


def extension_error_message() -> Optional[str]:
    """Why ``reattn._C`` is unusable, or None when it imported."""
    if _C is not None:
        return None
    return f"the compiled extension reattn._C failed to import ({EXTENSION_ERROR}); {REBUILD_HINT}"


def emulating() -> bool:
    """True when ``REATTN_CUDA_EMULATE=1``: backend="cuda" runs CPU tensors in the host emulator of its programs."""
    return os.environ.get("REATTN_CUDA_EMULATE", "0") == "1"


def extension_info() -> dict:
    """How ``reattn._C`` was built: ``{"cuda", "cuda_archs", "openmp", "torch_version"}``.

    Raises RuntimeError saying why when the extension is missing.
    """
    if _C is None:
        raise RuntimeError(extension_error_message())
    return dict(BUILD_INFO)
