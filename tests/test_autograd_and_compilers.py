"""What autograd and the compilers do with the fused backends, which ``backend="auto"`` and
``swap_attention`` pick without the user asking: each feature works, or fails saying which feature,
which backend and what to use instead.

* Double backward (``create_graph=True``: gradient penalties, MAML) through every fused backend
  (the backward ops' derivative is recomputed through the eager math), against backend="eager".
* ``torch.func`` transforms (grad, vmap, jacrev): ``auto`` runs them on the eager path; an explicit
  fused backend refuses them by name.
* ``torch.compile(..., fullgraph=True, dynamic=True)`` of the module and of the functional op on every
  backend that runs on CPU (triton in its interpreter, cuda in its emulator): no graph break, one
  graph for two shapes, the uncompiled results; and the issue's snippet with the default (inductor)
  backend.
* ``torch.jit.script`` is refused with the way out; ``torch.jit.trace`` and ``torch.export`` work, for
  ReAttention and for a swapped timm model.
"""
import pytest
import torch
import torch._dynamo

import reattn
from reattn.backends import unavailable_reason, Problem
from tests._tolerance import reduction_length, rounding_bound

BACKENDS = ("eager", "cpu", "triton", "cuda")
FUSED = ("cpu", "triton", "cuda")
NAMES = ("q", "k", "v", "mix_weight", "mix_bias", "norm_weight", "norm_bias")


def runs_on_cpu(backend):
    return unavailable_reason(backend, Problem(torch.device("cpu"), heads=4, head_dim=8, dtype=torch.float64))


def needs(backend):
    reason = runs_on_cpu(backend)
    return pytest.mark.skipif(reason is not None, reason=f"backend={backend!r} cannot run here: {reason}")


def problem(B=2, H=3, N=5, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = dict(q=torch.randn(B, H, N, D, generator=g, dtype=torch.float64),
             k=torch.randn(B, H, N, D, generator=g, dtype=torch.float64),
             v=torch.randn(B, H, N, D, generator=g, dtype=torch.float64),
             mix_weight=torch.eye(H, dtype=torch.float64) + 0.3 * torch.randn(H, H, generator=g, dtype=torch.float64),
             mix_bias=0.1 * torch.randn(H, generator=g, dtype=torch.float64),
             norm_weight=1 + 0.1 * torch.randn(H, generator=g, dtype=torch.float64),
             norm_bias=0.1 * torch.randn(H, generator=g, dtype=torch.float64))
    mask = torch.rand(B, 1, N, N, generator=g) > 0.3
    mask[..., 0] = True
    mask[0, 0, 1] = False  # a fully masked query row
    return {n: x.requires_grad_(True) for n, x in t.items()}, mask


MODES = {
    "none": dict(norm="none"),
    "layer": dict(norm="layer"),
    "batch-train": dict(norm="batch", training=True),
    "batch-eval": dict(norm="batch", training=False),
    "none+mask+dropout": dict(norm="none", training=True, dropout_p=0.3, masked=True),
    "batch-train+mask+dropout": dict(norm="batch", training=True, dropout_p=0.3, masked=True),
}


def call(backend, mode, t, mask, keep=None):
    kw = dict(MODES[mode])
    masked = kw.pop("masked", False)
    if kw["norm"] != "none":
        kw.update(norm_weight=t["norm_weight"], norm_bias=t["norm_bias"])
    if kw["norm"] == "batch":
        H = t["q"].shape[1]
        kw.update(running_mean=torch.zeros(H, dtype=torch.float64), running_var=torch.ones(H, dtype=torch.float64))
    if masked:
        kw.update(attn_mask=mask)
    args = [t[n] for n in NAMES[:5]]
    if keep is not None:  # replay the fused dropout pattern on the eager path
        return reattn.re_attention_ref(*args, dropout_mask=keep, **kw)
    return reattn.re_attention(*args, backend=backend, **kw)


def keep_mask(backend, seed, shape, p):
    if backend == "cpu":
        from reattn.backends.cpu import dropout_keep_mask
    else:
        from reattn.kernels.dropout import dropout_keep_mask
    return dropout_keep_mask(seed, shape, p)


def penalty_gradients(backend, mode, replay_of=None):
    """Gradient penalty: d/dx sum_i |d loss / d x_i|^2 over every input, through create_graph=True."""
    t, mask = problem()
    names = [n for n in NAMES if MODES[mode]["norm"] != "none" or not n.startswith("norm")]
    keep = None
    torch.manual_seed(7)
    if replay_of is not None and MODES[mode].get("dropout_p"):
        from reattn.backends._ladder import draw_dropout_seed

        B, H, N, _ = t["q"].shape
        keep = keep_mask(replay_of, draw_dropout_seed(torch.device("cpu")), (B, H, N, N), MODES[mode]["dropout_p"])
    out = call(backend, mode, t, mask, keep)
    loss = (out * out.detach().cos()).sum()
    first = torch.autograd.grad(loss, [t[n] for n in names], create_graph=True)
    penalty = sum((g ** 2).sum() for g in first)
    return names, torch.autograd.grad(penalty, [t[n] for n in names])


@pytest.mark.parametrize("backend", [pytest.param(b, marks=needs(b)) for b in FUSED])
@pytest.mark.parametrize("mode", list(MODES))
def test_double_backward_matches_eager(backend, mode):
    names, got = penalty_gradients(backend, mode)
    _, expected = penalty_gradients("eager", mode, replay_of=backend)
    # Every second derivative is a sum of terms of the size of the largest one (d mix_bias under training
    # BatchNorm is exactly 0: rounding noise on both sides), computed in float64 along the op's chains.
    scale = max(e.abs().max().item() for e in expected)
    bound = rounding_bound(torch.float64, reduction_length(2, 3, 5, 5, 4), scale)
    for name, a, e in zip(names, got, expected):
        assert (a - e).abs().max().item() <= bound, name


def test_double_backward_through_synchronized_batchnorm_is_refused():
    from reattn.backends._ladder import eager_double_backward

    t, _ = problem()
    args = [t[n].detach() for n in NAMES]
    with pytest.raises(RuntimeError, match=r"backend='cpu', sync_group=...\): double backward .* use backend='eager'"):
        eager_double_backward(torch.ones_like(args[0]), *args, None, None, (None,) * 7, backend="cpu", scale=0.5,
                              out_scale=1.0, norm="batch", eps=1e-5, dropout_p=0.0, synced=True)


# ---------------------------------------------------------------------------------------- torch.func

def functional(backend):
    def f(q, w):
        return reattn.re_attention(q, q.flip(-2), q.roll(1, -1), w, norm="layer", backend=backend)
    return f


def test_torch_func_transforms_under_auto_run_the_eager_path():
    t, _ = problem()
    q, w = t["q"].detach(), t["mix_weight"].detach()
    batched = torch.stack([q, 2 * q, -q])
    for transform, x in ((lambda f: torch.func.grad(lambda q, w: f(q, w).square().sum()), q),
                         (lambda f: torch.func.vmap(f, in_dims=(0, None)), batched),
                         (lambda f: torch.func.jacrev(lambda q, w: f(q, w)[0, 0, 0], argnums=1), q)):
        got = transform(functional("auto"))(x, w)
        expected = transform(functional("eager"))(x, w)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # The module (per-sample style: torch.func.grad over its parameters). Training BatchNorm mutates its
    # running statistics, which torch.func refuses for any module (nn.BatchNorm2d too): eval and LayerNorm.
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    for module in (reattn.ReAttention(16, 4).double().eval(), reattn.ReAttention(16, 4, norm="layer").double()):
        params = dict(module.named_parameters())
        grads = torch.func.grad(lambda p: torch.func.functional_call(module, p, (x,)).square().sum())(params)
        expected = torch.autograd.grad(module(x).square().sum(), list(params.values()))
        for name, e in zip(params, expected):
            torch.testing.assert_close(grads[name], e, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=needs(b)) for b in FUSED])
def test_torch_func_transforms_are_refused_by_the_fused_backends(backend):
    t, _ = problem()
    q, w = t["q"].detach(), t["mix_weight"].detach()
    message = (rf"backend='{backend}' cannot run on cpu: torch.func transforms \(vmap, grad, jacrev, jvp, ...\) "
               r"cannot run through the fused kernels' custom ops, .* backend='eager' supports them")
    with pytest.raises(ValueError, match=message):
        torch.func.grad(lambda q: functional(backend)(q, w).sum())(q)
    with pytest.raises(ValueError, match=message):
        torch.func.vmap(functional(backend), in_dims=(0, None))(q.unsqueeze(0), w)
    functional(backend)(q, w)  # outside a transform it runs


# ------------------------------------------------------------------------------------ torch.compile

def compile_and_count(fn, *inputs):
    """(graph breaks, graphs, results, compiled) of torch.compile(fn, fullgraph=True, dynamic=True) over the
    calls given. fullgraph makes a graph break an error; the count says the same where it does not raise."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    results = [compiled(*args) for args in inputs]
    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"], results, compiled


# Eval (BatchNorm folded into the mixing) and train (batch statistics); the interpreted/emulated kernels
# in training mode only, which also folds nothing and takes their longest path.
@pytest.mark.parametrize("backend, train", [pytest.param(b, t, marks=needs(b), id=f"{b}-{'train' if t else 'eval'}")
                                            for b in BACKENDS for t in (False, True) if t or b in ("eager", "cpu")])
def test_compile_module_fullgraph_dynamic_without_graph_breaks(backend, train):
    torch.manual_seed(0)
    module = reattn.ReAttention(32, 4, backend=backend).double().train(train)
    reference = reattn.ReAttention(32, 4, backend=backend).double().train(train)
    reference.load_state_dict(module.state_dict())
    xs = [(torch.randn(2, 17, 32, dtype=torch.float64),), (torch.randn(3, 9, 32, dtype=torch.float64),)]
    breaks, graphs, results, _ = compile_and_count(module, *xs)
    assert (breaks, graphs) == (0, 1)  # one graph serves both shapes: no recompilation
    for (x,), got in zip(xs, results):
        torch.testing.assert_close(got, reference(x), rtol=1e-12, atol=1e-12)
    results[0].sum().backward()  # through the compiled graph's backward
    assert module.qkv.weight.grad is not None


@pytest.mark.parametrize("backend", [pytest.param(b, marks=needs(b)) for b in BACKENDS])
def test_compile_functional_fullgraph_dynamic_without_graph_breaks(backend):
    def f(q, k, v, w, c, nw, nb, mask, rm, rv):
        a = reattn.re_attention(q, k, v, w, c, norm="layer", norm_weight=nw, norm_bias=nb, attn_mask=mask,
                                scale=0.4, out_scale=0.7, backend=backend)
        b = reattn.re_attention(q, k, v, w, c, norm="batch", norm_weight=nw, norm_bias=nb, running_mean=rm,
                                running_var=rv, training=True, attn_mask=mask, backend=backend)
        return a + b

    calls = []
    for N in (5, 8):
        t, mask = problem(N=N)
        stats = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
        calls.append(tuple(t[n] for n in NAMES) + (mask,) + stats)
    breaks, graphs, results, compiled = compile_and_count(f, *calls)
    assert (breaks, graphs) == (0, 1)
    for args, got in zip(calls, results):
        fresh = args[:-2] + (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
        torch.testing.assert_close(got, f(*fresh), rtol=1e-12, atol=1e-12)
    results[0].sum().backward()
    assert calls[0][3].grad is not None
    # training BatchNorm's "more than one unmasked value per head" check stays in the graph
    only_one = torch.zeros_like(calls[0][7])
    only_one[0, 0, 0, 0] = True
    with pytest.raises((ValueError, RuntimeError), match="more than one unmasked value per head"):
        compiled(*calls[0][:7], only_one, *calls[0][8:])


def test_the_issue_snippet_compiles_fullgraph_dynamic_with_inductor():
    # The README's compile example is this graph too: whichever runs second finds inductor's compiled code in
    # its on-disk cache (11.7 s -> 4.3 s measured for the compile on the dev machine).
    torch.manual_seed(0)
    module = reattn.ReAttention(32, 4)
    x = torch.randn(2, 17, 32)
    torch._dynamo.reset()
    out = torch.compile(module, fullgraph=True, dynamic=True)(x)
    # float32: inductor may reorder the projections' sums; the core's reductions are over N = 17 keys and
    # C = 32 channels, so the bound follows the output's magnitude at that length
    torch.testing.assert_close(out, module(x), rtol=0,
                               atol=rounding_bound(torch.float32, reduction_length(2, 4, 17, 17, 32),
                                                   module(x).abs().max().item()))


# ------------------------------------------------------------------------------------ TorchScript

def swapped_timm_model():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                              depth=2)
    reattn.swap_attention(model, norm="batch", mix_init="identity")
    return model.eval()


def test_jit_script_is_refused_saying_what_works():
    message = r"cannot be compiled by torch.jit.script .* use torch.jit.trace\(.*\) or torch.export.export"
    with pytest.raises(RuntimeError, match=message):
        torch.jit.script(reattn.ReAttention(32, 4))
    with pytest.raises(RuntimeError, match=message):
        torch.jit.script(swapped_timm_model())


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_jit_trace_and_export_work(backend):
    if runs_on_cpu(backend) is not None:
        pytest.skip(f"backend={backend!r} cannot run here: {runs_on_cpu(backend)}")
    torch.manual_seed(0)
    module = reattn.ReAttention(32, 4, backend=backend).eval()
    x, other = torch.randn(2, 17, 32), torch.randn(3, 9, 32)
    traced = torch.jit.trace(module, x)
    for inp in (x, other):  # the trace reads B and N from x: other shapes run too
        torch.testing.assert_close(traced(inp), module(inp), rtol=0, atol=0)
    exported = torch.export.export(module, (x,)).module()
    torch.testing.assert_close(exported(x), module(x), rtol=0, atol=0)


def test_jit_trace_and_export_of_a_swapped_timm_model():
    model = swapped_timm_model()
    images = torch.randn(2, 3, 32, 32)
    expected = model(images)
    torch.testing.assert_close(torch.jit.trace(model, images)(images), expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.export.export(model, (images,)).module()(images), expected, rtol=0, atol=0)
