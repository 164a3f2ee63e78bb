"""reattn.diagnostics: the paper's cross-layer similarity on small timm / vit-pytorch / reattn / official models."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reattn
from reattn.diagnostics import (CrossLayerSimilarity, attention_maps, column_cosine_sums,
                                cross_layer_similarity)
from tests._official import OfficialReAttention
from tests._tolerance import rounding_bound

timm = pytest.importorskip("timm")

DIM, HEADS, DEPTH = 32, 4, 3


def naive_similarity(maps):
    """M^{p,q}_{h,t} by the paper's formula, loop by loop; mean over images and tokens -> [L, L, H]."""
    L = len(maps)
    B, H, _, N = maps[0].shape
    out = torch.zeros(L, L, H, dtype=torch.float64)
    for p in range(L):
        for q in range(L):
            for h in range(H):
                total = 0.0
                for b in range(B):
                    for t in range(N):
                        a, c = maps[p][b, h, :, t].double(), maps[q][b, h, :, t].double()
                        total += float(a @ c / (a.norm() * c.norm()))
                out[p, q, h] = total / (B * N)
    return out


def tiny_timm(seed=0):
    torch.manual_seed(seed)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=5)
    with torch.no_grad():  # timm's init gives near-uniform maps; make them peaked
        for blk in model.blocks:
            blk.attn.qkv.weight.normal_(0, 0.5)
    return model


def images(n=4, seed=1):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_column_cosine_is_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 3, 5, 6, generator=g) for _ in range(3)]
    got = column_cosine_sums(maps) / (2 * 6)
    torch.testing.assert_close(got, naive_similarity(maps), rtol=1e-5, atol=1e-6)


def test_identical_maps_are_similar_and_disjoint_columns_are_not():
    a = torch.rand(2, 2, 4, 4)
    sums = column_cosine_sums([a, a, a]) / 8
    torch.testing.assert_close(sums, torch.ones(3, 3, 2, dtype=torch.float64))
    top = torch.zeros(1, 1, 4, 4)
    top[..., :2, :] = 1  # columns live on queries 0, 1
    bottom = torch.zeros(1, 1, 4, 4)
    bottom[..., 2:, :] = 1  # columns live on queries 2, 3
    sums = column_cosine_sums([top, bottom]) / 4
    torch.testing.assert_close(sums[0, 1], torch.zeros(1, dtype=torch.float64))
    # all-zero columns count as similarity 0, never NaN
    assert torch.isfinite(column_cosine_sums([torch.zeros(1, 1, 3, 3)] * 2)).all()


def test_similar_blocks_rule():
    sim = torch.tensor([[1.0, 0.95, 0.5, 0.4], [0.95, 1.0, 0.6, 0.5], [0.5, 0.6, 1.0, 0.92], [0.4, 0.5, 0.92, 1.0]],
                       dtype=torch.float64)
    result = CrossLayerSimilarity(similarity=sim, per_head=sim[..., None], names=list("abcd"), num_images=1)
    assert result.is_similar == [False, True, False, True]
    assert result.similar_blocks == 2
    torch.testing.assert_close(result.adjacent, torch.tensor([0.95, 0.6, 0.92], dtype=torch.float64))


def test_collapse_one_attention_run_repeatedly():
    """A module applied to the same tokens four times gives four identical maps: 3 similar blocks."""
    class Repeat(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = reattn.ReAttention(DIM, HEADS)

        def forward(self, x):
            return sum(self.attn(x) for _ in range(4))

    result = cross_layer_similarity(Repeat(), torch.randn(3, 7, DIM))
    assert result.names == ["attn"] * 4
    torch.testing.assert_close(result.similarity, torch.ones(4, 4, dtype=torch.float64), rtol=0, atol=1e-6)
    assert result.similar_blocks == 3


def _capture_inputs(modules):
    inputs, handles = [], []
    for m in modules:
        handles.append(m.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach())))
    return inputs, handles


def test_timm_maps_are_its_softmax_and_state_is_restored():
    model = tiny_timm()
    model.train()
    attns = [blk.attn for blk in model.blocks]
    fused = [a.fused_attn for a in attns]
    inputs, handles = _capture_inputs(attns)
    maps = attention_maps(model, images())
    for h in handles:
        h.remove()
    assert [n for n, _ in maps] == [f"blocks.{i}.attn" for i in range(DEPTH)]
    for (_, got), attn, x in zip(maps, attns, inputs):
        B, N, _ = x.shape
        q, k, _ = attn.qkv(x).reshape(B, N, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        expected = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # left as found: training mode, fused_attn, no hooks
    assert all(m.training for m in model.modules())
    assert [a.fused_attn for a in attns] == fused
    assert all(not a._forward_hooks and not a.attn_drop._forward_hooks for a in attns)


def test_swapped_reattention_maps_and_outputs():
    model = tiny_timm()
    for i, blk in enumerate(model.blocks):
        blk.attn = reattn.ReAttention(DIM, HEADS, qkv_bias=True, backend="triton" if i == 0 else "auto")
    model.eval()
    x = images()
    with torch.no_grad():
        expected_out = model(x)
    attns = [blk.attn for blk in model.blocks]
    inputs, handles = _capture_inputs(attns)
    outs = []
    maps = attention_maps(model, x, forward=lambda m, batch: outs.append(m(batch)))
    for h in handles:
        h.remove()
    # the caller still receives the output alone, unchanged
    torch.testing.assert_close(outs[0], expected_out, rtol=1e-5, atol=1e-6)
    for (_, got), attn, inp in zip(maps, attns, inputs):
        eager = reattn.ReAttention(DIM, HEADS, qkv_bias=True, backend="eager").eval()
        eager.load_state_dict(attn.state_dict())
        with torch.no_grad():
            _, expected = eager(inp, return_attention=True)
        torch.testing.assert_close(got, expected)
    assert attns[0].backend == "triton" and attns[1].backend == "auto"
    assert all(not a._forward_hooks and not a._forward_pre_hooks for a in attns)
    result = cross_layer_similarity(model, x, batch_size=3)
    assert result.similarity.shape == (DEPTH, DEPTH)
    # cos(a, a) = 1, computed in float32 from a dot product and two norms over a map column of N entries:
    # within the rounding bound of that reduction (tests/_tolerance.py), whatever the CPU
    n_tokens = maps[0][1].shape[-2]
    torch.testing.assert_close(torch.diagonal(result.similarity), torch.ones(DEPTH, dtype=torch.float64), rtol=0,
                               atol=rounding_bound(torch.float32, 3 * n_tokens, 1.0))
    torch.testing.assert_close(result.similarity, result.similarity.T)
    # batch_size only changes the chunking: the mean over 4 images is the same
    again = cross_layer_similarity(model, x, batch_size=4)
    torch.testing.assert_close(result.per_head, again.per_head, rtol=1e-5, atol=1e-6)
    naive = naive_similarity([m for _, m in maps])
    torch.testing.assert_close(result.per_head, naive, rtol=1e-4, atol=1e-5)


def test_vit_pytorch_vit_and_deepvit():
    vit_pytorch = pytest.importorskip("vit_pytorch")
    from vit_pytorch.deepvit import DeepViT

    torch.manual_seed(0)
    kwargs = dict(image_size=16, patch_size=4, num_classes=5, dim=DIM, depth=DEPTH, heads=HEADS, mlp_dim=64,
                  dim_head=8)
    vit = vit_pytorch.ViT(**kwargs)
    maps = attention_maps(vit, images())
    assert len(maps) == DEPTH and maps[0][1].shape == (4, HEADS, 17, 17)
    torch.testing.assert_close(maps[0][1].sum(-1), torch.ones(4, HEADS, 17))  # softmax rows

    deep = DeepViT(**kwargs)
    attns = [layer[0] for layer in deep.transformer.layers]
    inputs, handles = _capture_inputs(attns)
    maps = attention_maps(deep, images())
    for h in handles:
        h.remove()
    assert len(maps) == DEPTH
    for (_, got), attn, x in zip(maps, attns, inputs):  # recompute vit-pytorch's re-attention map
        with torch.no_grad():
            q, k, _ = attn.to_qkv(attn.norm(x)).chunk(3, dim=-1)
            q, k = (t.reshape(4, 17, HEADS, 8).transpose(1, 2) for t in (q, k))
            p = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)
            m = torch.einsum("bhij,hg->bgij", p, attn.reattn_weights)
            expected = attn.reattn_norm(m)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    result = cross_layer_similarity(deep, images(), name="vit-pytorch DeepViT")
    assert "vit-pytorch DeepViT: 3 blocks" in result.summary()


def test_official_deepvit_reattention():
    class Official(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(OfficialReAttention(DIM, HEADS) for _ in range(DEPTH))

        def forward(self, x):
            self.returned = []
            for blk in self.blocks:
                y, attn = blk(x)
                self.returned.append(attn)
                x = x + y
            return x

    torch.manual_seed(0)
    model = Official()
    maps = attention_maps(model, torch.randn(2, 9, DIM))
    assert [n for n, _ in maps] == [f"blocks.{i}" for i in range(DEPTH)]
    for (_, got), expected in zip(maps, model.returned):
        torch.testing.assert_close(got, expected)


def test_heatmap_png(tmp_path):
    pytest.importorskip("matplotlib")
    result = cross_layer_similarity(tiny_timm(), images(), name="tiny timm ViT")
    fig = result.figure()
    heat_ax, line_ax, bar_ax = fig.axes
    assert heat_ax.get_xlabel() == "block q" and heat_ax.get_ylabel() == "block p"
    assert "cosine similarity" in bar_ax.get_ylabel()
    assert "similar blocks" in line_ax.get_title()
    path = result.save_heatmap(tmp_path / "collapse.png")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="found no attention module"):
        cross_layer_similarity(nn.Sequential(nn.Linear(4, 4)), torch.randn(2, 4))
    with pytest.raises(ValueError, match="no module named 'nope'"):
        cross_layer_similarity(tiny_timm(), images(), attention_modules=["nope"])
    with pytest.raises(ValueError, match="not an attention module"):
        cross_layer_similarity(tiny_timm(), images(), attention_modules=["head"])
    model = tiny_timm()
    result = cross_layer_similarity(model, images(), attention_modules=["blocks.0.attn", model.blocks[2].attn])
    assert result.names == ["blocks.0.attn", "blocks.2.attn"]
