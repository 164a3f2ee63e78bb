"""The providers the microbenchmark compares, all on the same q, k, v and the same weights.

  eager          the official DeepViT ReAttention core as shipped: q @ kᵀ · scale -> softmax ->
                 1×1 ``nn.Conv2d`` over heads -> ``nn.BatchNorm2d(H)`` -> @ v (for norm "layer"
                 the BatchNorm is swapped for LayerNorm across heads); the baseline of speed-ups
  <backend>      every fused reattn backend ``reattn.available_backends(device)`` lists
                 ("triton", "cuda", "cpu"), through ``reattn.re_attention(backend=...)`` with the
                 eager module's weights and running statistics
  torch.compile  ``torch.compile`` of the eager core (its compile time is reported separately)
  vit-pytorch    vit-pytorch's DeepViT core (einsum mixing, LayerNorm across heads), norm "layer" only:
                 vit-pytorch has no BatchNorm variant (and no mixing bias, so the layer configs use a
                 zero mixing bias everywhere and all providers compute the same function)
  sdpa           ``F.scaled_dot_product_attention(q, k, v)``: attention with no head mixing, the floor

Norm modes: "batch-train" (BatchNorm2d with batch statistics, the official training mode),
"batch-eval" (running statistics, the official inference mode) and "layer".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import reattn

NORM_MODES = ("batch-train", "batch-eval", "layer")
BASELINE = "eager"
COMPILED = "torch.compile"
VIT_PYTORCH = "vit-pytorch"
SDPA = "sdpa"


class HeadLayerNorm(nn.Module):
    """LayerNorm across heads at every map entry: [B, H, Nq, Nk] -> permute -> LayerNorm(H) -> back."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(heads)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        return self.norm(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class OfficialCore(nn.Module):
    """The official DeepViT ReAttention between its qkv and proj layers, in its order of operations.

    ``reatten_matrix`` and ``var_norm`` carry the official names. Attention dropout (p = 0 in the
    benchmark) and ``reatten_scale`` (1.0 unless ``transform_scale``) are identities and left out.
    """

    def __init__(self, heads: int, head_dim: int, norm_mode: str) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.reatten_matrix = nn.Conv2d(heads, heads, 1, 1)
        self.var_norm: nn.Module = nn.BatchNorm2d(heads) if norm_mode.startswith("batch") else HeadLayerNorm(heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.var_norm(self.reatten_matrix(attn))
        return attn @ v


class VitPytorchCore(nn.Module):
    """vit-pytorch's DeepViT ``Attention`` between ``to_qkv`` and ``to_out``, with its own modules.

    ``reattn_weights`` [in, out] and ``reattn_norm`` (Rearrange -> LayerNorm(H) -> Rearrange) are
    taken from a ``vit_pytorch.deepvit.Attention`` instance; the three einsums are its forward's.
    """

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        from vit_pytorch.deepvit import Attention

        shipped = Attention(dim=heads * head_dim, heads=heads, dim_head=head_dim)
        self.scale = shipped.scale
        self.reattn_weights = shipped.reattn_weights
        self.reattn_norm = shipped.reattn_norm

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dots = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.scale
        attn = dots.softmax(dim=-1)
        attn = torch.einsum("b h i j, h g -> b g i j", attn, self.reattn_weights)
        attn = self.reattn_norm(attn)
        return torch.einsum("b h i j, b h j d -> b h i d", attn, v)


def make_eager_core(heads: int, head_dim: int, norm_mode: str, device: torch.device, dtype: torch.dtype,
                    seed: int = 0) -> OfficialCore:
    """The eager module with deterministic, non-trivial weights and running statistics."""
    if norm_mode not in NORM_MODES:
        raise ValueError(f"norm mode must be one of {NORM_MODES}, got {norm_mode!r}")
    generator = torch.Generator().manual_seed(seed)
    core = OfficialCore(heads, head_dim, norm_mode)
    with torch.no_grad():
        mixing = core.reatten_matrix
        mixing.weight.copy_((torch.eye(heads) + 0.3 * torch.randn(heads, heads, generator=generator)).view_as(
            mixing.weight))
        mixing.bias.copy_(0.01 * torch.randn(heads, generator=generator))
        if norm_mode == "layer":
            mixing.bias.zero_()  # vit-pytorch has no mixing bias; keep every provider on one function
            norm = core.var_norm.norm
        else:
            norm = core.var_norm
            # Running statistics of the order of a trained model's: mean ~1/Nk is tiny, var small.
            norm.running_mean.copy_(0.01 * torch.rand(heads, generator=generator))
            norm.running_var.copy_(0.01 + 0.01 * torch.rand(heads, generator=generator))
        norm.weight.copy_(1.0 + 0.1 * torch.randn(heads, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(heads, generator=generator))
    core.train(norm_mode == "batch-train")
    return core.to(device=device, dtype=dtype)


@dataclass
class Provider:
    """A named callable (q, k, v) -> O, or the reason it cannot run here."""

    name: str
    fn: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]
    skip_reason: Optional[str] = None
    parameters: tuple = ()
    compiled: bool = False


def fused_backend_provider(backend: str, core: OfficialCore, norm_mode: str) -> Provider:
    """``reattn.re_attention`` on ``core``'s weights (and running statistics, updated in place in training)."""
    heads = core.heads
    mixing = core.reatten_matrix
    if norm_mode == "layer":
        layer_norm = core.var_norm.norm
        norm_arguments = dict(norm="layer", norm_weight=layer_norm.weight, norm_bias=layer_norm.bias,
                              eps=layer_norm.eps)
    else:
        batch_norm = core.var_norm
        norm_arguments = dict(norm="batch", norm_weight=batch_norm.weight, norm_bias=batch_norm.bias,
                              running_mean=batch_norm.running_mean, running_var=batch_norm.running_var,
                              training=norm_mode == "batch-train", momentum=batch_norm.momentum, eps=batch_norm.eps)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return reattn.re_attention(q, k, v, mixing.weight.view(heads, heads), mixing.bias, scale=core.scale,
                                   backend=backend, **norm_arguments)

    return Provider(backend, run, parameters=tuple(core.parameters()))


def correctness_tool_reason(backend: str, device: torch.device) -> Optional[str]:
    from reattn.kernels.launch import interpreting

    if backend == "triton" and device.type == "cpu" and interpreting():
        return "TRITON_INTERPRET=1 runs the Triton kernels in the interpreter, a correctness tool: not benchmarked"
    if backend == "cuda" and device.type == "cpu":
        return ("REATTN_CUDA_EMULATE=1 runs the CUDA programs in their host emulator, a correctness tool: "
                "not benchmarked")
    return None


def build_providers(core: OfficialCore, norm_mode: str, device: torch.device, dtype: torch.dtype,
                    with_compile: bool = True, excluded: Sequence[str] = ()) -> List[Provider]:
    """Every provider for one configuration, the eager baseline first; ``core`` is the eager module.

    Providers named in ``excluded`` are listed as skipped (never silently left out).
    """
    heads, head_dim = core.heads, core.head_dim
    providers = [Provider(BASELINE, core, parameters=tuple(core.parameters()))]
    for backend in reattn.available_backends(device):
        if backend == "eager":
            continue
        reason = correctness_tool_reason(backend, device)
        providers.append(Provider(backend, None, reason) if reason
                         else fused_backend_provider(backend, core, norm_mode))
    if with_compile:
        providers.append(_compiled_provider(core) if COMPILED not in excluded else Provider(COMPILED, None))
    if norm_mode == "layer":
        providers.append(_vit_pytorch_provider(core, heads, head_dim, device, dtype))
    providers.append(Provider(SDPA, lambda q, k, v: F.scaled_dot_product_attention(q, k, v)))
    for provider in providers:
        if provider.name in excluded:
            provider.fn, provider.skip_reason = None, "excluded with --exclude"
    return providers


def _compiled_provider(core: OfficialCore) -> Provider:
    import torch._dynamo
    import torch._inductor.config as inductor_config

    # Compile in this process: inductor's pool of compile workers keeps the CPU busy for seconds
    # after a compile and would slow down the next measurements.
    inductor_config.compile_threads = 1
    # A fresh cache per configuration: each one is compiled (and its compile timed) from scratch,
    # and the recompile limit can never silently send a configuration back to eager.
    torch._dynamo.reset()
    return Provider(COMPILED, torch.compile(core, dynamic=False), parameters=tuple(core.parameters()), compiled=True)


def _vit_pytorch_provider(core: OfficialCore, heads: int, head_dim: int, device: torch.device,
                          dtype: torch.dtype) -> Provider:
    try:
        vit = VitPytorchCore(heads, head_dim)
    except ImportError as error:
        return Provider(VIT_PYTORCH, None, f"vit-pytorch is not importable ({error})")
    with torch.no_grad():
        # vit-pytorch's reattn_weights is [in, out]: the transpose of the Conv2d weight [out, in].
        vit.reattn_weights.copy_(core.reatten_matrix.weight.view(heads, heads).t())
        vit.reattn_norm[1].weight.copy_(core.var_norm.norm.weight)
        vit.reattn_norm[1].bias.copy_(core.var_norm.norm.bias)
    vit = vit.to(device=device, dtype=dtype)
    return Provider(VIT_PYTORCH, vit, parameters=tuple(vit.parameters()))


def provider_names(device: torch.device) -> Dict[str, str]:
    """The providers a run on ``device`` can list, with one line on each (for --help and the README)."""
    names = {BASELINE: "official DeepViT core (matmul, softmax, Conv2d, BatchNorm2d, matmul)"}
    for backend in reattn.available_backends(device):
        if backend != "eager":
            names[backend] = f"reattn fused backend {backend!r}"
    names[COMPILED] = "torch.compile of the eager core"
    names[VIT_PYTORCH] = "vit-pytorch DeepViT core (norm 'layer' only)"
    names[SDPA] = "F.scaled_dot_product_attention, no head mixing (floor)"
    return names
