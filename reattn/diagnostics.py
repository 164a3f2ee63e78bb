r"""Attention collapse, measured the way the DeepViT paper measures it.

DeepViT (Zhou et al., arXiv 2103.11886, Sec. 3) shows that the attention maps of a deep ViT
become similar from block to block ("attention collapse") with a cross-layer similarity: for
blocks p and q, head h and token t,

.. math::

    M^{p,q}_{h,t} = \frac{{A^p_{h,:,t}}^\top A^q_{h,:,t}}{\lVert A^p_{h,:,t} \rVert \, \lVert A^q_{h,:,t} \rVert}

the cosine similarity between column t of head h's map in block p and in block q (the column is
the attention token t *receives* from every query). :func:`cross_layer_similarity` averages it over
heads, tokens and images and counts the "similar blocks"; :meth:`CrossLayerSimilarity.save_heatmap`
draws the block-by-block matrix as a PNG.

Which map is analysed, per module type (found in ``model``'s modules, in the order they run):

* :class:`reattn.ReAttention`: A, the map after re-attention (mixing, norm and scale), the map the
  paper analyses for DeepViT; plain attention (``apply_transform=False``) gives the softmax map.
  The module is run with ``return_attention=True`` (eager, for that forward only).
* timm ``Attention`` (and timm attentions with ``fused_attn`` and an ``attn_drop``): the softmax
  map, taken from ``attn_drop``'s input with ``fused_attn`` switched off for the analysis.
* vit-pytorch ``ViT`` attention (``attend``: the softmax map) and ``DeepViT`` attention
  (``reattn_norm``: the map after re-attention).
* the official DeepViT ``ReAttention`` (returns ``(x, attn)``): its returned map.

The maps are materialized for analysis only, through hooks that are removed afterwards; the
model runs in eval mode under ``torch.no_grad()`` and every module's training flag, ``fused_attn``
and ``backend`` are restored when the analysis ends.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

SIMILARITY_THRESHOLD = 0.9


# ----------------------------------------------------------------------------- the metric

def column_cosine_sums(maps: Sequence[torch.Tensor], eps: float = 1e-12) -> torch.Tensor:
    """Σ over images and tokens of M^{p,q}_{h,t} for every block pair: [L, L, H] float64.

    ``maps``: L tensors [B, H, Nq, Nk] (one per block, same shape). Column t of head h is
    ``A[b, h, :, t]``; a column of zeros (a token nobody attends to) has similarity 0 with
    everything. Divide by ``B * Nk`` for the mean over images and tokens.
    """
    if len(maps) == 0:
        raise ValueError("column_cosine_sums: no attention maps")
    shape = maps[0].shape
    for i, a in enumerate(maps):
        if a.dim() != 4 or a.shape != shape:
            raise ValueError(f"column_cosine_sums: every map must be [B, H, Nq, Nk] with the same shape; map 0 is "
                             f"{list(shape)}, map {i} is {list(a.shape)}")
    cols = []
    for a in maps:
        a = a.detach().to(torch.float32)
        norm = a.norm(dim=-2, keepdim=True).clamp_min(eps)  # ||A[b, h, :, t]||
        cols.append(a / norm)
    x = torch.stack(cols)  # [L, B, H, Nq, Nk]
    # M[p, q, h] = Σ_{b, t} Σ_i x[p, b, h, i, t] x[q, b, h, i, t]
    return torch.einsum("pbhit,qbhit->pqh", x, x).to(torch.float64)


@dataclass
class CrossLayerSimilarity:
    """The result of :func:`cross_layer_similarity`.

    Attributes:
        similarity: [L, L] float64, M^{p,q} averaged over heads, tokens and images (symmetric,
            ones on the diagonal except for all-zero maps).
        per_head: [L, L, H] float64, averaged over tokens and images only.
        names: the L analysed modules' names (``model.named_modules()``), in call order.
        threshold: the similarity above which a block counts as similar to the one before it.
        num_images: how many images were averaged over.
    """

    similarity: torch.Tensor
    per_head: torch.Tensor
    names: List[str]
    threshold: float = SIMILARITY_THRESHOLD
    num_images: int = 0
    model_name: str = field(default="")

    @property
    def num_blocks(self) -> int:
        return self.similarity.shape[0]

    @property
    def adjacent(self) -> torch.Tensor:
        """[L - 1]: similarity between block p and block p + 1 (0-based p)."""
        return torch.diagonal(self.similarity, offset=1).clone()

    @property
    def is_similar(self) -> List[bool]:
        """Per block: True when its map's similarity with the previous block's map exceeds ``threshold``."""
        adjacent = self.adjacent.tolist()
        return [False] + [s > self.threshold for s in adjacent]

    @property
    def similar_blocks(self) -> int:
        """The number of similar blocks (see :func:`cross_layer_similarity` for the definition)."""
        return sum(self.is_similar)

    def summary(self) -> str:
        adj = self.adjacent
        mean_adj = float(adj.mean()) if adj.numel() else float("nan")
        return (f"{self.model_name + ': ' if self.model_name else ''}{self.num_blocks} blocks, "
                f"{self.similar_blocks} similar (adjacent similarity > {self.threshold:g}), mean adjacent "
                f"similarity {mean_adj:.3f}, over {self.num_images} images")

    def __str__(self) -> str:  # pragma: no cover - formatting
        return self.summary()

    def figure(self, title: Optional[str] = None):
        """A matplotlib Figure (no pyplot, no global state): the heatmap and the adjacent-block curve."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        L = self.num_blocks
        sim = self.similarity.numpy()
        fig = Figure(figsize=(11, 4.6), layout="constrained")
        FigureCanvasAgg(fig)
        heat_ax, line_ax = fig.subplots(1, 2, width_ratios=[1.15, 1])
        vmin = min(0.0, float(sim.min()))
        image = heat_ax.imshow(sim, cmap="viridis", vmin=vmin, vmax=1.0, origin="lower",
                               extent=(0.5, L + 0.5, 0.5, L + 0.5))
        heat_ax.set_xlabel("block q")
        heat_ax.set_ylabel("block p")
        heat_ax.set_title("cross-layer similarity of attention maps")
        ticks = list(range(1, L + 1)) if L <= 16 else list(range(1, L + 1, max(1, L // 8)))
        heat_ax.set_xticks(ticks)
        heat_ax.set_yticks(ticks)
        bar = fig.colorbar(image, ax=heat_ax, shrink=0.9)
        bar.set_label("cosine similarity, mean over heads, tokens, images")

        blocks = list(range(2, L + 1))
        line_ax.plot(blocks, self.adjacent.numpy(), marker="o", label="similarity with the previous block")
        line_ax.axhline(self.threshold, color="tab:red", linestyle="--", label=f"threshold {self.threshold:g}")
        similar = [b for b, s in zip(range(1, L + 1), self.is_similar) if s]
        if similar:
            line_ax.scatter(similar, [float(self.similarity[b - 1, b - 2]) for b in similar], color="tab:red",
                            zorder=3, label="similar block")
        line_ax.set_xlabel("block p")
        line_ax.set_ylabel("$M^{p-1,p}$ (cosine similarity)")
        low = min([0.0] + self.adjacent.tolist())
        line_ax.set_ylim(low - 0.05, 1.3)  # room above 1 for the legend
        line_ax.set_xlim(0.5, L + 0.5)
        line_ax.set_xticks(ticks)
        line_ax.grid(alpha=0.3)
        line_ax.legend(loc="upper left", fontsize=8, ncol=2)
        line_ax.set_title(f"similar blocks: {self.similar_blocks} of {L}")
        suptitle = title or self.model_name or "attention collapse"
        fig.suptitle(f"{suptitle}  ({self.num_images} images)")
        return fig

    def save_heatmap(self, path, title: Optional[str] = None, dpi: int = 120) -> str:
        """Write the figure (heatmap, colorbar, adjacent-similarity curve) as a PNG; returns the path."""
        fig = self.figure(title)
        fig.savefig(path, dpi=dpi)
        return str(path)


# ----------------------------------------------------------------------------- capturing maps

class _Capture:
    """Hooks on the attention modules of a model; ``maps`` fills in call order during a forward."""

    def __init__(self) -> None:
        self.maps: List[Tuple[str, torch.Tensor]] = []
        self.handles: list = []
        self.restore: List[Callable[[], None]] = []

    def add(self, name: str, module: nn.Module) -> bool:
        """Hook ``module`` if it is an attention we know; False otherwise."""
        from reattn.module import ReAttention

        if isinstance(module, ReAttention):
            self._hook_reattn(name, module)
        elif _is_official_reattention(module):
            self.handles.append(module.register_forward_hook(self._official_hook(name)))
        elif isinstance(getattr(module, "reattn_norm", None), nn.Module) and hasattr(module, "reattn_weights"):
            # vit-pytorch DeepViT Attention: the output of its LayerNorm across heads is A.
            self.handles.append(module.reattn_norm.register_forward_hook(self._output_hook(name)))
        elif isinstance(getattr(module, "attend", None), nn.Softmax) and hasattr(module, "to_qkv"):
            # vit-pytorch ViT Attention: nn.Softmax module.
            self.handles.append(module.attend.register_forward_hook(self._output_hook(name)))
        elif _is_timm_attention(module):
            # timm: the manual path computes softmax -> attn_drop; read attn_drop's input. timm < 0.9
            # has only that path (no fused_attn switch).
            if hasattr(module, "fused_attn"):
                fused = module.fused_attn
                module.fused_attn = False
                self.restore.append(lambda m=module, f=fused: setattr(m, "fused_attn", f))
            self.handles.append(module.attn_drop.register_forward_hook(self._input_hook(name)))
        else:
            return False
        return True

    def _record(self, name: str, attn: Any) -> None:
        if not isinstance(attn, torch.Tensor) or attn.dim() != 4:
            shape = list(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
            raise ValueError(f"cross_layer_similarity: {name!r} gave an attention map of shape {shape}, expected "
                             "[B, H, Nq, Nk]")
        self.maps.append((name, attn.detach()))

    def _output_hook(self, name):
        def hook(module, args, output):
            self._record(name, output)
        return hook

    def _input_hook(self, name):
        def hook(module, args, output):
            self._record(name, args[0])
        return hook

    def _official_hook(self, name):
        def hook(module, args, output):
            if not (isinstance(output, tuple) and len(output) == 2):
                raise ValueError(f"cross_layer_similarity: {name!r} looks like the official DeepViT ReAttention "
                                 "but did not return (x, attn)")
            self._record(name, output[1])
        return hook

    def _hook_reattn(self, name: str, module: nn.Module) -> None:
        """Ask the module for its map (return_attention=True, eager) and hand its caller the output alone."""
        state = {}

        def pre_hook(mod, args, kwargs):
            if len(args) > 3:  # return_attention given positionally: leave the call alone
                state["asked"], state["patched"] = bool(args[3]), False
                return None
            state["asked"], state["patched"] = bool(kwargs.get("return_attention", False)), True
            state["backend"] = mod.backend
            mod.backend = "eager"  # only eager materializes A
            return args, dict(kwargs, return_attention=True)

        def hook(mod, args, kwargs, output):
            if state.get("patched"):
                mod.backend = state["backend"]
            if isinstance(output, tuple):
                self._record(name, output[1])
                return output if state.get("asked") else output[0]
            raise ValueError(f"cross_layer_similarity: {name!r} did not return its attention map")

        self.handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for undo in self.restore:
            undo()
        self.handles, self.restore = [], []


def _is_timm_attention(module: nn.Module) -> bool:
    """timm's Attention of any release (the classes swap_attention knows), or a timm-style attention
    with a ``fused_attn`` switch, a ``qkv`` projection and an ``attn_drop`` Dropout after its softmax."""
    from reattn.swap import supported_attention_types

    if not isinstance(getattr(module, "attn_drop", None), nn.Dropout) or not hasattr(module, "qkv"):
        return False
    return hasattr(module, "fused_attn") or type(module) in supported_attention_types()


def _is_official_reattention(module: nn.Module) -> bool:
    """The official DeepViT ReAttention (or a transcription): returns (x, attn)."""
    return (hasattr(module, "apply_transform") and hasattr(module, "qkv") and hasattr(module, "scale")
            and type(module).__name__.endswith("ReAttention"))


def _find_attention(model: nn.Module, capture: _Capture,
                    attention_modules: Optional[Iterable[Union[str, nn.Module]]]) -> List[str]:
    named = list(model.named_modules())
    if attention_modules is not None:
        by_name = dict(named)
        by_id = {id(m): n for n, m in named}
        chosen = []
        for item in attention_modules:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(f"cross_layer_similarity: the model has no module named {item!r}")
                chosen.append((item, by_name[item]))
            else:
                chosen.append((by_id.get(id(item), type(item).__name__), item))
        for name, module in chosen:
            if not capture.add(name, module):
                raise ValueError(f"cross_layer_similarity: {name!r} ({type(module).__name__}) is not an attention "
                                 "module this function knows how to read")
        return [n for n, _ in chosen]
    found: List[str] = []
    for name, module in named:
        if any(name.startswith(prefix + ".") for prefix in found):
            continue  # inside an attention module already hooked
        if capture.add(name, module):
            found.append(name)
    if not found:
        raise ValueError(
            f"cross_layer_similarity: found no attention module in {type(model).__name__} (known: reattn.ReAttention, "
            "timm Attention, vit-pytorch ViT/DeepViT Attention, the official DeepViT ReAttention); pass "
            "attention_modules=[...]"
        )
    return found


def attention_maps(model: nn.Module, images: torch.Tensor, *, attention_modules=None,
                   forward: Optional[Callable[[nn.Module, torch.Tensor], Any]] = None) -> List[Tuple[str, torch.Tensor]]:
    """Run ``model`` once on ``images`` (eval mode, no grad) and return ``[(module name, map [B, H, Nq, Nk])]``
    in the order the attention modules ran. Materializes every block's map: for analysis only."""
    capture = _Capture()
    modes = [(m, m.training) for m in model.modules()]
    try:
        _find_attention(model, capture, attention_modules)
        model.eval()
        with torch.no_grad():
            if forward is None:
                model(images)
            else:
                forward(model, images)
        return capture.maps
    finally:
        capture.remove()
        for module, training in modes:
            module.training = training


def cross_layer_similarity(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 16,
    threshold: float = SIMILARITY_THRESHOLD,
    attention_modules: Optional[Iterable[Union[str, nn.Module]]] = None,
    forward: Optional[Callable[[nn.Module, torch.Tensor], Any]] = None,
    name: str = "",
) -> CrossLayerSimilarity:
    r"""The DeepViT paper's cross-layer similarity of attention maps, and the number of similar blocks.

    For every pair of blocks (p, q), head h and token t, M^{p,q}_{h,t} is the cosine similarity of
    the attention token t receives from all queries in block p and in block q (column t of head
    h's [N, N] map); ``similarity[p, q]`` averages it over heads, tokens and ``images``.

    "Similar blocks": the paper reports how many blocks are similar, with 0.9 as its
    similarity level, but its exact counting rule could not be checked here, so this is the rule
    used: block p (p ≥ 2) is *similar* when ``similarity[p-1, p] > threshold`` (its map is
    almost the previous block's); block 1 never is. ``result.similarity`` holds the whole matrix
    for any other rule.

    Args:
        model: any ViT whose attention modules are listed in the module docstring: timm, vit-pytorch,
            reattn's own, the official DeepViT, plain or with attention swapped for ReAttention.
        images: the input batch, passed as ``model(images)`` (or ``forward(model, batch)``).
        batch_size: images per forward (all L maps of a batch are held at once, in float32).
        threshold: similarity level for "similar blocks" (0.9 as in the paper).
        attention_modules: names or modules to analyse instead of finding them automatically.
        forward: ``forward(model, batch)`` when ``model(batch)`` is not how the model is called.
        name: a label for the summary and the figure.

    Returns:
        :class:`CrossLayerSimilarity` (``similarity`` [L, L], ``per_head`` [L, L, H], ``similar_blocks``,
        ``adjacent``, ``save_heatmap(path)``).
    """
    if not isinstance(images, torch.Tensor) or images.shape[0] == 0:
        raise ValueError("cross_layer_similarity: images must be a non-empty tensor batch [B, ...]")
    total: Optional[torch.Tensor] = None
    names: Optional[List[str]] = None
    columns = 0
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        maps = attention_maps(model, batch, attention_modules=attention_modules, forward=forward)
        batch_names = [n for n, _ in maps]
        if names is None:
            names = batch_names
        elif batch_names != names:
            raise ValueError("cross_layer_similarity: the attention modules ran differently from one batch to the next")
        sums = column_cosine_sums([m for _, m in maps])
        total = sums if total is None else total + sums
        a = maps[0][1]
        columns += a.shape[0] * a.shape[-1]
    per_head = total / columns
    return CrossLayerSimilarity(similarity=per_head.mean(dim=-1), per_head=per_head, names=names,
                                threshold=threshold, num_images=int(images.shape[0]), model_name=name)
