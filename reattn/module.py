"""``ReAttention``: the official DeepViT attention module, computed by ``reattn.re_attention``."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from reattn._batchnorm import fold_batchnorm_eval
from reattn._checks import NORMS
from reattn._collectives import module_sync_group
from reattn.backends import BACKEND_CHOICES
from reattn.functional import re_attention

MIX_INITS = ("official", "identity")


def _combine_causal(attn_mask: Optional[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    if attn_mask is None:
        return causal
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, float("-inf"))


class ReAttention(nn.Module):
    """Re-attention (DeepViT), a drop-in for the official module and for timm's ``block.attn``.

    The constructor and state_dict match the official DeepViT ``ReAttention``, so its checkpoints
    load with ``strict=True``: ``qkv.*``, ``proj.*``, ``reatten_matrix.weight`` [H, H, 1, 1],
    ``reatten_matrix.bias`` [H] and ``var_norm.*`` (a real ``nn.BatchNorm2d(H)``, whose running
    statistics and ``num_batches_tracked`` are updated in training exactly as the official module
    updates them).

    Args:
        dim: embedding dimension C of the tokens; must be divisible by ``num_heads``.
        num_heads: number of heads H. Head dim is ``dim // num_heads`` unless ``head_dim`` is given.
        qkv_bias: bias in the qkv projection.
        qk_scale: softmax scale; ``qk_scale or head_dim ** -0.5`` as in the official code.
        attn_drop: dropout probability on the attention probabilities (before mixing).
        proj_drop: dropout probability after the output projection.
        expansion_ratio: qkv width over ``dim``; the official forward only works with 3.
        apply_transform: re-attention on; with False this is plain multi-head attention
            (``F.scaled_dot_product_attention``) holding only ``qkv`` and ``proj``.
        transform_scale: multiply the normalized map by the qk scale (official ``reatten_scale``).
        norm: "batch" (official, ``nn.BatchNorm2d(H)``), "layer" (``nn.LayerNorm(H)`` across heads,
            vit-pytorch's DeepViT; same ``var_norm.weight``/``var_norm.bias`` names) or "none".
        mix_init: "official" (``nn.Conv2d``'s default init, as the official module) or "identity"
            (W = I, bias 0: with norm "none" the module then starts as plain attention).
        backend: passed to :func:`reattn.re_attention` ("auto", "eager", "triton", "cuda", "cpu").
        head_dim: per-head width D; None (official) means ``dim // num_heads``. When given, qkv is
            ``Linear(dim, 3 * num_heads * head_dim)`` and proj ``Linear(num_heads * head_dim, dim)``
            (timm's ``attn_head_dim``, vit-pytorch's ``dim_head``).
        qk_norm_layer: None (official), or a constructor called with ``head_dim`` for ``q_norm`` and
            ``k_norm``, applied per head to q and k before the scores (timm's ``qk_norm=True``).
            Without it the module has no ``q_norm``/``k_norm`` entries in its state_dict.
        sync_stats: synchronize training-mode BatchNorm statistics across the processes of
            ``process_group`` (None: the world), with ``nn.SyncBatchNorm`` semantics (see
            :mod:`reattn.distributed`). Like ``nn.SyncBatchNorm`` it only synchronizes in training
            mode with torch.distributed initialized and more than one process; it also does when
            ``nn.SyncBatchNorm.convert_sync_batchnorm`` has turned ``var_norm`` into a SyncBatchNorm.
        process_group: the ``torch.distributed`` group for ``sync_stats``; None means the world.

    Shapes: ``forward(x [B, N, C]) -> [B, N, C]``.

    Compilers: ``torch.compile`` (also ``fullgraph=True``, ``dynamic=True``), ``torch.jit.trace`` and
    ``torch.export`` work with every backend (the fused kernels are ``torch.library`` custom ops with
    fake implementations). ``torch.jit.script`` is not supported, for this module and for a model
    holding it (a timm model after ``swap_attention``): the backend is chosen in Python at each call,
    which TorchScript cannot compile; scripting raises a RuntimeError saying so. Use
    ``torch.jit.trace(model, example)`` or ``torch.export.export(model, (example,))`` instead.
    """

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling: say why, and what works.
        raise RuntimeError(
            "reattn.ReAttention cannot be compiled by torch.jit.script (its backend is chosen in Python at each "
            "call, which TorchScript cannot compile), nor can a model that holds it, such as a timm model after "
            "reattn.swap_attention; use torch.jit.trace(model, example_inputs) or "
            "torch.export.export(model, (example_inputs,)), which both work")

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        expansion_ratio: int = 3,
        apply_transform: bool = True,
        transform_scale: bool = False,
        *,
        norm: str = "batch",
        mix_init: str = "official",
        backend: str = "auto",
        head_dim: Optional[int] = None,
        qk_norm_layer: Optional[Callable[[int], nn.Module]] = None,
        sync_stats: bool = False,
        process_group: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or not isinstance(num_heads, int) or dim <= 0 or num_heads <= 0:
            raise ValueError(f"ReAttention: dim and num_heads must be positive ints, got dim={dim!r}, "
                             f"num_heads={num_heads!r}")
        if head_dim is not None and (not isinstance(head_dim, int) or head_dim <= 0):
            raise ValueError(f"ReAttention: head_dim must be a positive int or None, got {head_dim!r}")
        if head_dim is None and dim % num_heads != 0:
            raise ValueError(f"ReAttention: dim={dim} must be divisible by num_heads={num_heads}")
        if expansion_ratio != 3:
            raise ValueError(f"ReAttention: expansion_ratio must be 3 (q, k and v of width dim; the official "
                             f"forward reshapes qkv into 3 parts), got {expansion_ratio!r}")
        if norm not in NORMS:
            raise ValueError(f"ReAttention: norm must be one of {NORMS}, got {norm!r}")
        if mix_init not in MIX_INITS:
            raise ValueError(f"ReAttention: mix_init must be one of {MIX_INITS}, got {mix_init!r}")
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"ReAttention: backend must be one of {BACKEND_CHOICES}, got {backend!r}")
        if not 0.0 <= attn_drop < 1.0 or not 0.0 <= proj_drop < 1.0:
            raise ValueError(f"ReAttention: attn_drop and proj_drop must be in [0, 1), got {attn_drop}, {proj_drop}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads if head_dim is None else head_dim
        attn_dim = num_heads * self.head_dim
        self.apply_transform = apply_transform
        self.norm = norm
        self.mix_init = mix_init
        self.backend = backend
        self.sync_stats = bool(sync_stats)
        self.process_group = process_group
        # `or`, not `is None`: the official code treats qk_scale=0 as "not given".
        self.scale = qk_scale or self.head_dim ** -0.5
        if apply_transform:
            self.reatten_matrix = nn.Conv2d(num_heads, num_heads, 1, 1)
            if norm == "batch":
                self.var_norm = nn.BatchNorm2d(num_heads)
            elif norm == "layer":
                self.var_norm = nn.LayerNorm(num_heads)
            self.reatten_scale = self.scale if transform_scale else 1.0
            if mix_init == "identity":
                with torch.no_grad():
                    self.reatten_matrix.weight.copy_(torch.eye(num_heads).view(num_heads, num_heads, 1, 1))
                    self.reatten_matrix.bias.zero_()
        self.qkv = nn.Linear(dim, attn_dim * expansion_ratio, bias=qkv_bias)
        self.q_norm = qk_norm_layer(self.head_dim) if qk_norm_layer is not None else None
        self.k_norm = qk_norm_layer(self.head_dim) if qk_norm_layer is not None else None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, apply_transform={self.apply_transform}, "
                f"norm={self.norm!r}, backend={self.backend!r}")

    def _norm_arguments(self, mix_weight: torch.Tensor, mix_bias: torch.Tensor) -> Dict[str, Any]:
        """re_attention arguments for mixing, norm and dropout, following nn.BatchNorm2d.forward."""
        dropout_p = self.attn_drop.p if self.attn_drop.training else 0.0
        base = dict(mix_weight=mix_weight, mix_bias=mix_bias, dropout_p=dropout_p)
        if self.norm == "none":
            return dict(base, norm="none", training=dropout_p > 0)
        if self.norm == "layer":
            ln = self.var_norm
            return dict(base, norm="layer", norm_weight=ln.weight, norm_bias=ln.bias, eps=ln.eps,
                        training=dropout_p > 0)
        bn = self.var_norm
        use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        if use_batch_stats:
            momentum = 0.0 if bn.momentum is None else bn.momentum
            if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                if bn.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                    momentum = 1.0 / float(bn.num_batches_tracked)
            sync_group = None
            if bn.training:  # nn.SyncBatchNorm synchronizes in training mode only
                sync_group = module_sync_group(getattr(self, "sync_stats", False),
                                               getattr(self, "process_group", None), bn)
            return dict(base, norm="batch", norm_weight=bn.weight, norm_bias=bn.bias, running_mean=bn.running_mean,
                        running_var=bn.running_var, training=True, momentum=momentum, eps=bn.eps,
                        sync_group=sync_group)
        if dropout_p > 0:
            # Dropout on but BatchNorm in eval (frozen statistics): fold the affine eval-mode
            # BatchNorm into the mixing so one call can train dropout with fixed statistics.
            weight, bias = fold_batchnorm_eval(mix_weight, mix_bias, bn.weight, bn.bias, bn.running_mean,
                                               bn.running_var, bn.eps)
            return dict(base, mix_weight=weight, mix_bias=bias, norm="none", training=True)
        return dict(base, norm="batch", norm_weight=bn.weight, norm_bias=bn.bias, running_mean=bn.running_mean,
                    running_var=bn.running_var, training=False, eps=bn.eps)

    def _plain_attention(self, q, k, v, attn_mask, return_attention):
        dropout_p = self.attn_drop.p if self.attn_drop.training else 0.0
        if not return_attention:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=self.scale)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if attn_mask is not None:
            attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
        attn = self.attn_drop(attn.softmax(dim=-1))
        return attn @ v, attn

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        return_attention: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """x [B, N, C] -> [B, N, C]; with ``return_attention`` also A [B, H, N, N] (materialized).

        ``attn_mask`` follows :func:`reattn.re_attention` (bool True = attend, or additive float);
        ``is_causal`` adds a lower-triangular mask. Each alone means what it means in timm's
        ``Attention.forward`` (and SDPA); given together they are intersected, where timm's fused
        path refuses the pair and its manual path ignores ``attn_mask``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ReAttention: x must be [B, N, C] with C = dim = {self.dim}, got {shape}")
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if is_causal:
            attn_mask = _combine_causal(attn_mask, N, x.device)
        if self.apply_transform:
            H = self.num_heads
            result = re_attention(
                q, k, v, scale=self.scale, out_scale=self.reatten_scale, attn_mask=attn_mask, backend=self.backend,
                return_attention=return_attention,
                **self._norm_arguments(self.reatten_matrix.weight.view(H, H), self.reatten_matrix.bias),
            )
        else:
            result = self._plain_attention(q, k, v, attn_mask, return_attention)
        out, attn = result if return_attention else (result, None)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)))
        return (out, attn) if return_attention else out
