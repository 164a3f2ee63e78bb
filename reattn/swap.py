"""``swap_attention``: turn the attention modules of timm and vit-pytorch models into ``ReAttention``.

Supported attention modules (matched by exact class, so look-alikes with other forwards are
never touched):

* timm's ``Attention`` (``timm.layers.Attention`` since timm 1.0.16,
  ``timm.models.vision_transformer.Attention`` before), used by ``VisionTransformer``, DeiT and
  every model built from it. The new module reuses the original ``qkv``, ``proj``, dropout and
  (when present, ``qk_norm=True``) ``q_norm``/``k_norm`` modules, so their parameters and
  ``requires_grad`` flags are carried over as the very same objects, and it accepts every timm
  forward signature: ``forward(x)``, ``forward(x, attn_mask=...)``,
  ``forward(x, attn_mask=..., is_causal=...)``.

  Checked with timm 0.4.12 to 1.0.31 (which releases, and what differs between them, is in
  docs/timm_versions.md); where timm's own paths disagree,
  ReAttention follows SDPA and timm's default fused path (bool mask True = attend, float mask
  added; ``attn_mask`` with ``is_causal`` means their intersection).

  Refused with a ``ValueError`` naming the feature and the timm version, the model left
  untouched: ``scale_norm=True``, ``gated=True`` (no Re-attention counterpart), a submodule or
  a forward argument not listed above (a later timm's addition is never silently dropped), and
  a ``scale`` changed from ``head_dim ** -0.5`` while ``fused_attn`` is on (timm's fused path
  then ignores ``scale``, so the original has no single scale to carry over).
* vit-pytorch's ``vit.Attention`` (``ViT``): a pre-norm module; it becomes a
  :class:`PreNormReAttention` holding the original ``norm`` LayerNorm and a ``ReAttention``.
* vit-pytorch's ``deepvit.Attention`` (``DeepViT``), already Re-attention: converted, not
  re-initialized. Its ``reattn_weights`` [in h, out g] become ``reatten_matrix.weight`` [g, h, 1, 1]
  (the transpose; no bias, as vit-pytorch), its LayerNorm across heads becomes ``var_norm`` with
  ``norm="layer"``. ``norm`` and ``mix_init`` are ignored for these: the trained mixing is kept and
  the outputs are those of the original module.

``blocks`` indexes these modules in ``model.named_modules()`` order, which for timm's
``VisionTransformer`` (``model.blocks[i].attn``) and vit-pytorch (``transformer.layers[i][0]``)
is the block index. Negative indices count from the end (``blocks=range(-5, 0)`` = the last 5).

What holds after a swap with ``mix_init="identity"`` (W = I, c = 0):

* ``norm="none"``: Re-attention with W = I, c = 0 and no norm *is* plain attention, so the model
  gives the original logits to floating-point round-off (same math, a different summation
  order than SDPA), in train and eval mode alike, and so do the gradients. (With attention
  dropout on, the dropout masks are drawn differently from timm's, so only the distributions agree.)
* ``norm="batch"``: the new ``BatchNorm2d(H)`` gets ``running_mean = 0`` and
  ``running_var = 1 - eps`` (instead of PyTorch's fresh 1) and ``weight = 1``, ``bias = 0``, so in
  **eval mode** ``(M - 0) / sqrt((1 - eps) + eps) = M``: the logits equal the original's to
  round-off (the fresh-statistics default would scale every map by ``1 / sqrt(1 + eps)``). In
  **train mode** BatchNorm normalizes with batch statistics (the official DeepViT behaviour), so
  training-mode outputs differ from the original model from the first step, and the running
  statistics move away from the identity as training goes on.
* ``norm="layer"``: LayerNorm across heads is never the identity; no equality holds.

With ``mix_init="official"`` the mixing starts at ``nn.Conv2d``'s random init (the official
DeepViT init) and nothing holds.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import sys
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

from reattn.module import ReAttention

__all__ = ["PreNormReAttention", "swap_attention", "supported_attention_types"]


class PreNormReAttention(nn.Module):
    """``attn(norm(x))``: vit-pytorch's attention modules apply their LayerNorm inside the module.

    Attributes: ``norm`` (the original ``nn.LayerNorm(dim)``) and ``attn`` (a :class:`ReAttention`).
    """

    def __init__(self, norm: nn.Module, attn: ReAttention) -> None:
        super().__init__()
        self.norm = norm
        self.attn = attn

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                return_attention: bool = False):
        return self.attn(self.norm(x), attn_mask=attn_mask, is_causal=is_causal, return_attention=return_attention)


# Where each timm release defines its ``Attention``: timm <= 1.0.15 in vision_transformer.py
# (timm < 0.9 has no timm.layers at all; 0.9 - 1.0.15 has timm.layers without an Attention),
# timm >= 1.0.16 in timm/layers/attention.py, re-exported by timm.layers and vision_transformer.
_TIMM_ATTENTION_PATHS = ("timm.layers", "timm.models.vision_transformer")


@functools.lru_cache(maxsize=None)
def _timm_types() -> Tuple[type, ...]:
    # Cached: _kind calls this for every child module, and a failing import (timm < 0.9 has no
    # timm.layers) searches sys.path again each time.
    types = []
    for path in _TIMM_ATTENTION_PATHS:
        try:
            types.append(getattr(importlib.import_module(path), "Attention"))
        except (ImportError, AttributeError):
            pass
    return tuple(dict.fromkeys(types))


def _timm_version() -> str:
    timm = sys.modules.get("timm")
    return str(getattr(timm, "__version__", "unknown"))


def _vit_pytorch_types() -> Tuple[Optional[type], Optional[type]]:
    try:
        from vit_pytorch.vit import Attention as VitAttention
    except ImportError:
        VitAttention = None
    try:
        from vit_pytorch.deepvit import Attention as DeepVitAttention
    except ImportError:
        DeepVitAttention = None
    return VitAttention, DeepVitAttention


def supported_attention_types() -> List[type]:
    """The attention classes :func:`swap_attention` converts (those importable here)."""
    vit, deepvit = _vit_pytorch_types()
    return list(_timm_types()) + [t for t in (vit, deepvit) if t is not None]


def _kind(module: nn.Module) -> Optional[str]:
    if type(module) in _timm_types():
        return "timm"
    vit, deepvit = _vit_pytorch_types()
    if vit is not None and type(module) is vit:
        return "vit_pytorch"
    if deepvit is not None and type(module) is deepvit:
        return "vit_pytorch_deepvit"
    return None


def _is_identity(module: Optional[nn.Module]) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _finish(new: ReAttention, reference: torch.Tensor, training: bool) -> ReAttention:
    """Move the freshly created parts to the original's device and dtype, copy the mode."""
    new.to(device=reference.device, dtype=reference.dtype)
    new.train(training)
    return new


def _identity_batchnorm(new: ReAttention) -> None:
    bn = new.var_norm
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0)
        bn.bias.zero_()


# What swap_attention knows of timm's Attention, over the releases it was tested with (see the
# module docstring). Anything else - a submodule or forward argument a later timm adds - is
# refused, because ignoring it would silently change the function.
_TIMM_CHILDREN = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"}
_TIMM_FORWARD_ARGUMENTS = {"x", "attn_mask", "is_causal"}


def _check_timm(old: nn.Module) -> Tuple[nn.Linear, int, int]:
    """(qkv, num_heads, head_dim) of a timm ``Attention``, or ValueError for what cannot be converted."""
    where = f"swap_attention: timm {_timm_version()} {type(old).__name__}"
    unknown = sorted(name for name, _ in old.named_children() if name not in _TIMM_CHILDREN)
    if unknown:
        raise ValueError(f"{where} has submodules {unknown} that swap_attention does not know "
                         f"(known: {sorted(_TIMM_CHILDREN)}); not swapped")
    arguments = [name for name in inspect.signature(type(old).forward).parameters if name != "self"]
    unknown = [name for name in arguments if name not in _TIMM_FORWARD_ARGUMENTS]
    if unknown:
        raise ValueError(f"{where}.forward takes {unknown}, which ReAttention does not implement "
                         f"(known: {sorted(_TIMM_FORWARD_ARGUMENTS)}); not swapped")
    if not _is_identity(getattr(old, "norm", None)):
        raise ValueError(f"{where} with scale_norm=True (a norm on the attention output before proj) has no "
                         f"Re-attention counterpart; not swapped")
    if getattr(old, "gate", None) is not None:
        raise ValueError(f"{where} with gated=True (a sigmoid gate on the attention output) has no "
                         f"Re-attention counterpart; not swapped")
    qkv = getattr(old, "qkv", None)
    if not isinstance(qkv, nn.Linear):
        raise ValueError(f"{where}.qkv must be an nn.Linear, got {type(qkv).__name__}")
    for name in ("attn_drop", "proj_drop"):
        if not isinstance(getattr(old, name, None), nn.Dropout):
            raise ValueError(f"{where}.{name} must be an nn.Dropout, got {type(getattr(old, name, None)).__name__}")
    heads = old.num_heads
    # timm < 0.9 has no head_dim attribute (always dim // num_heads there).
    head_dim = getattr(old, "head_dim", None) or qkv.out_features // (3 * heads)
    if qkv.out_features != 3 * heads * head_dim:
        raise ValueError(f"{where}.qkv has {qkv.out_features} outputs, expected "
                         f"3 * num_heads * head_dim = {3 * heads * head_dim}")
    if not isinstance(old.proj, nn.Linear) or old.proj.in_features != heads * head_dim:
        raise ValueError(f"{where}.proj must be an nn.Linear with {heads * head_dim} inputs, got {old.proj!r}")
    # timm >= 0.9 computes with SDPA's default scale head_dim ** -0.5 when fused_attn is on and
    # with self.scale when off: a changed scale makes the original depend on that switch.
    if getattr(old, "fused_attn", False) and float(old.scale) != head_dim ** -0.5:
        raise ValueError(f"{where}.scale = {float(old.scale)!r} differs from head_dim ** -0.5 = {head_dim ** -0.5!r}, "
                         f"which its fused path (fused_attn=True) uses instead: the original has no single "
                         f"scale to carry over (set its scale back, or its fused_attn to False); not swapped")
    return qkv, heads, head_dim


def _from_timm(old: nn.Module, norm: str, mix_init: str, backend: str) -> ReAttention:
    qkv, heads, head_dim = _check_timm(old)
    new = ReAttention(qkv.in_features, heads, qkv_bias=qkv.bias is not None, qk_scale=float(old.scale),
                      norm=norm, mix_init=mix_init, backend=backend, head_dim=head_dim)
    # The original modules themselves: parameters, requires_grad flags and dropout rates carry over.
    new.qkv = qkv
    new.proj = old.proj
    new.attn_drop = old.attn_drop
    new.proj_drop = old.proj_drop
    if not _is_identity(getattr(old, "q_norm", None)):
        new.q_norm = old.q_norm
    if not _is_identity(getattr(old, "k_norm", None)):
        new.k_norm = old.k_norm
    _finish(new, qkv.weight, old.training)
    if norm == "batch" and mix_init == "identity":
        _identity_batchnorm(new)
    return new


def _vit_pytorch_parts(old: nn.Module):
    """(dim, heads, head_dim, qkv, proj, proj_drop) of a vit-pytorch attention module."""
    qkv = old.to_qkv
    heads = old.heads
    head_dim = qkv.out_features // (3 * heads)
    to_out = old.to_out
    if isinstance(to_out, nn.Identity):  # vit-pytorch skips the projection when heads == 1 and dim_head == dim
        proj, proj_drop = nn.Identity(), nn.Identity()
    elif isinstance(to_out, nn.Sequential) and len(to_out) == 2 and isinstance(to_out[0], nn.Linear):
        proj, proj_drop = to_out[0], to_out[1]
    else:
        raise ValueError(f"swap_attention: unexpected vit-pytorch to_out {to_out!r}")
    return qkv.in_features, heads, head_dim, qkv, proj, proj_drop


def _wrap_pre_norm(old: nn.Module, new: ReAttention) -> nn.Module:
    norm = getattr(old, "norm", None)  # vit-pytorch < 0.40 had the LayerNorm in a PreNorm wrapper outside
    return new if norm is None else PreNormReAttention(norm, new)


def _from_vit_pytorch(old: nn.Module, norm: str, mix_init: str, backend: str) -> nn.Module:
    dim, heads, head_dim, qkv, proj, proj_drop = _vit_pytorch_parts(old)
    new = ReAttention(dim, heads, qkv_bias=qkv.bias is not None, qk_scale=float(old.scale), norm=norm,
                      mix_init=mix_init, backend=backend, head_dim=head_dim)
    new.qkv, new.proj, new.attn_drop, new.proj_drop = qkv, proj, old.dropout, proj_drop
    _finish(new, qkv.weight, old.training)
    if norm == "batch" and mix_init == "identity":
        _identity_batchnorm(new)
    return _wrap_pre_norm(old, new)


def _from_vit_pytorch_deepvit(old: nn.Module, backend: str) -> nn.Module:
    dim, heads, head_dim, qkv, proj, proj_drop = _vit_pytorch_parts(old)
    layer_norm = old.reattn_norm[1]
    if not isinstance(layer_norm, nn.LayerNorm):
        raise ValueError(f"swap_attention: unexpected vit-pytorch reattn_norm {old.reattn_norm!r}")
    new = ReAttention(dim, heads, qkv_bias=qkv.bias is not None, qk_scale=float(old.scale), norm="layer",
                      backend=backend, head_dim=head_dim)
    weight = old.reattn_weights  # [in h, out g]: M_g = sum_h W[h, g] P_h
    mixing = nn.Conv2d(heads, heads, 1, 1, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        mixing.weight.copy_(weight.detach().t().reshape(heads, heads, 1, 1))
    mixing.weight.requires_grad_(weight.requires_grad)
    new.reatten_matrix = mixing
    new.var_norm = layer_norm
    new.qkv, new.proj, new.attn_drop, new.proj_drop = qkv, proj, old.dropout, proj_drop
    _finish(new, qkv.weight, old.training)
    return _wrap_pre_norm(old, new)


def _convert(old: nn.Module, kind: str, norm: str, mix_init: str, backend: str) -> nn.Module:
    if kind == "timm":
        return _from_timm(old, norm, mix_init, backend)
    if kind == "vit_pytorch":
        return _from_vit_pytorch(old, norm, mix_init, backend)
    return _from_vit_pytorch_deepvit(old, backend)


def _find(model: nn.Module) -> List[Tuple[Optional[nn.Module], str, nn.Module, str]]:
    """(parent, attribute, module, kind) for every supported attention module, in named_modules order."""
    kind = _kind(model)
    if kind is not None:
        return [(None, "", model, kind)]
    found = []

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            child_kind = _kind(child)
            if child_kind is not None:
                found.append((parent, name, child, child_kind))
            else:
                visit(child)

    visit(model)
    return found


def _select(blocks: Optional[Iterable[int]], count: int) -> List[int]:
    if blocks is None:
        return list(range(count))
    if isinstance(blocks, int):
        blocks = [blocks]
    chosen = []
    for index in blocks:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"swap_attention: blocks must hold ints, got {index!r}")
        if not -count <= index < count:
            raise ValueError(f"swap_attention: block index {index} out of range for {count} attention modules")
        chosen.append(index % count)
    return sorted(set(chosen))


def swap_attention(
    model: nn.Module,
    *,
    norm: str = "batch",
    mix_init: str = "identity",
    blocks: Optional[Iterable[int]] = None,
    backend: str = "auto",
) -> nn.Module:
    """Replace attention modules of ``model`` with :class:`reattn.ReAttention`, in place; return ``model``.

    Args:
        model: a timm model built from timm's ``Attention`` (``VisionTransformer``, DeiT, ...), a
            vit-pytorch ``ViT`` or ``DeepViT``, any module containing such attention modules, or
            one attention module itself (then the replacement is returned).
        norm: "batch" (official DeepViT, ``BatchNorm2d(H)``), "layer" or "none", for plain
            attention modules (vit-pytorch ``DeepViT`` modules keep their LayerNorm).
        mix_init: "identity" (W = I, c = 0; see the module docstring for exactly when the swapped
            model reproduces the original's outputs) or "official" (``nn.Conv2d``'s random init).
        blocks: indices (negative from the end) of the attention modules to swap, in
            ``named_modules()`` order, i.e. the block indices of a ViT; None swaps all. The others are
            left untouched. DeepViT-S/L use re-attention in the last blocks only:
            ``blocks=range(-5, 0)``.
        backend: the ``re_attention`` backend of the new modules ("auto", "eager", "triton", ...).

    Raises:
        ValueError: no supported attention module in ``model``, a block index out of range, or a
            module using a feature Re-attention cannot reproduce (timm ``scale_norm``/``gated``, a
            submodule or forward argument of timm's ``Attention`` it does not know, a changed
            ``scale`` that timm's fused path ignores; see the module docstring).
    """
    found = _find(model)
    if not found:
        swapped = sum(isinstance(m, ReAttention) for m in model.modules())
        if swapped:
            raise ValueError(f"swap_attention: {type(model).__name__} is already swapped: it holds {swapped} "
                             "reattn.ReAttention module(s) and no attention module left to swap")
        names = ", ".join(f"{t.__module__}.{t.__qualname__}" for t in supported_attention_types()) or "none importable"
        raise ValueError(f"swap_attention: no supported attention module found in {type(model).__name__} "
                         f"(supported: {names})")
    # Convert everything first: an error leaves the model untouched, never half swapped.
    swaps = [(found[i][0], found[i][1], _convert(found[i][2], found[i][3], norm, mix_init, backend))
             for i in _select(blocks, len(found))]
    for parent, name, new in swaps:
        if parent is None:
            return new
        setattr(parent, name, new)
    return model
