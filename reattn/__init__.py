"""reattn: fused Re-attention (DeepViT) for PyTorch.

Public API:
  re_attention       the functional op (every backend, every norm mode)
  re_attention_ref   the eager reference in the official order of operations
  ReAttention        drop-in module with the official DeepViT constructor and state_dict names
  fold_batchnorm_eval, available_backends, extension_info
  explain_backend    which backend a call would run on, and why (backend="auto" on GPUs: measured only)
  cross_layer_similarity   the DeepViT paper's attention-collapse metric (reattn.diagnostics)
  convert_sync_reattention BatchNorm statistics across processes (reattn.distributed)
  swap_attention     turn timm / vit-pytorch attention modules into ReAttention, in place
  models             the official DeepViT models (official state_dict keys) and converters
"""
import torch  # noqa: F401  (loads libc10/libtorch before the compiled extension)

from reattn._extension import extension_info
from reattn.backends import BACKENDS, available_backends
from reattn.functional import explain_backend, fold_batchnorm_eval, re_attention
from reattn.module import ReAttention
from reattn.reference import re_attention_ref
from reattn import diagnostics, distributed  # noqa: E402
from reattn.diagnostics import cross_layer_similarity
from reattn.distributed import convert_sync_reattention
from reattn.swap import swap_attention
from reattn import models  # noqa: E402  (after ReAttention: the models are built from it)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ReAttention",
    "available_backends",
    "convert_sync_reattention",
    "cross_layer_similarity",
    "diagnostics",
    "distributed",
    "explain_backend",
    "extension_info",
    "fold_batchnorm_eval",
    "re_attention",
    "models",
    "re_attention_ref",
    "swap_attention",
]
