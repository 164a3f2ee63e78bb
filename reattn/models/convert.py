"""State-dict converters into reattn's module layout.

vit-pytorch's ``DeepViT`` is a different network from the official DeepViT (a linear patch
embedding between two LayerNorms, the pre-norm LayerNorm inside the attention and feed-forward
modules, no final norm, a LayerNorm + Linear head, Re-attention with LayerNorm across heads and
no mixing bias), so its weights cannot become an official-layout
:class:`reattn.models.DeepVisionTransformer`. They convert into the layout
:func:`reattn.swap_attention` gives a vit-pytorch ``DeepViT``: each attention module becomes a
:class:`reattn.swap.PreNormReAttention` (``norm`` + a :class:`reattn.ReAttention` ``attn`` with
``norm="layer"``), everything else keeps its keys::

    model = reattn.swap_attention(vit_pytorch.deepvit.DeepViT(**same_arguments))
    model.load_state_dict(convert_vit_pytorch_deepvit(vit_pytorch_state_dict), strict=True)

gives the vit-pytorch model's outputs (tests/models/test_deepvit.py checks it to round-off).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Optional

import torch

__all__ = ["convert_vit_pytorch_deepvit"]

# Keys below one vit-pytorch deepvit.Attention prefix P -> keys below P in the swapped layout.
_RENAMES = {
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
    "to_qkv.weight": "attn.qkv.weight",
    "to_qkv.bias": "attn.qkv.bias",
    "reattn_norm.1.weight": "attn.var_norm.weight",
    "reattn_norm.1.bias": "attn.var_norm.bias",
    "to_out.0.weight": "attn.proj.weight",
    "to_out.0.bias": "attn.proj.bias",
}


def convert_vit_pytorch_deepvit(
    state_dict: Mapping[str, torch.Tensor], blocks: Optional[Iterable[int]] = None,
) -> "OrderedDict[str, torch.Tensor]":
    """Convert a vit-pytorch ``DeepViT`` (or any module holding its ``deepvit.Attention``) state_dict.

    Every attention module (found by its ``reattn_weights`` key) selected by ``blocks`` (indices in
    state_dict order, negative from the end, None = all; the same selection as
    :func:`reattn.swap_attention`'s ``blocks``) is renamed per the table below; other keys are
    copied unchanged. ``reattn_weights`` [in h, out g] becomes ``attn.reatten_matrix.weight``
    [g, h, 1, 1] (its transpose, as the official 1×1 convolution is indexed [out, in]).

    =========================  =============================
    vit-pytorch (below P)      reattn (below P)
    =========================  =============================
    ``norm.*``                 ``norm.*``
    ``to_qkv.weight``          ``attn.qkv.weight``
    ``reattn_weights``         ``attn.reatten_matrix.weight``
    ``reattn_norm.1.*``        ``attn.var_norm.*``
    ``to_out.0.*``             ``attn.proj.*``
    =========================  =============================

    Raises:
        ValueError: no ``reattn_weights`` key, a block index out of range, or a key below an
            attention prefix that the table does not know (an unexpected vit-pytorch version).
    """
    prefixes: List[str] = [key[: -len("reattn_weights")] for key in state_dict
                           if re.fullmatch(r"(.*\.)?reattn_weights", key)]
    if not prefixes:
        raise ValueError("convert_vit_pytorch_deepvit: no 'reattn_weights' key; not a vit-pytorch DeepViT state_dict")
    count = len(prefixes)
    if blocks is None:
        chosen = set(range(count))
    else:
        chosen = set()
        for index in ([blocks] if isinstance(blocks, int) else blocks):
            if isinstance(index, bool) or not isinstance(index, int) or not -count <= index < count:
                raise ValueError(f"convert_vit_pytorch_deepvit: bad block index {index!r} for {count} attention "
                                 f"modules")
            chosen.add(index % count)
    selected = [prefixes[i] for i in sorted(chosen)]
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in state_dict.items():
        prefix = next((p for p in selected if key.startswith(p)), None)
        if prefix is None:
            out[key] = value
            continue
        rest = key[len(prefix):]
        if rest == "reattn_weights":
            heads = value.shape[0]
            out[prefix + "attn.reatten_matrix.weight"] = value.t().reshape(heads, heads, 1, 1).clone()
        elif rest in _RENAMES:
            out[prefix + _RENAMES[rest]] = value
        else:
            raise ValueError(f"convert_vit_pytorch_deepvit: unexpected key {key!r} in a vit-pytorch DeepViT "
                             f"attention module")
    return out
