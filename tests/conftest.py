"""Test-wide setup.

Without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be set before
any kernel module is imported, so it is set here, at collection start.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
