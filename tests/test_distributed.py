"""BatchNorm statistics across processes: 2 gloo processes on CPU against one process on the whole batch.

One spawn (2 processes, world size 2) runs every case; each rank writes its outputs, input
gradients, parameter gradients and running statistics to a file, and the tests compare them with a
single process running the concatenated batch: outputs and input gradients slice by slice,
parameter gradients summed over ranks (DDP averages them: the test divides), running statistics
equal on both ranks.
"""
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import reattn
from reattn.backends import Problem, resolve_backend, unavailable_reason
from reattn.distributed import all_reduce_sum, convert_sync_reattention, group_size

WORLD = 2
B_LOCAL = 2
H, NQ, NK, D = 3, 5, 6, 4
DIM, HEADS, TOKENS = 16, 4, 7


# ----------------------------------------------------------------------------- shared cases

def functional_case(dtype, seed=0, masked=False):
    """Global tensors of a functional case (identical in every process: same seed)."""
    g = torch.Generator().manual_seed(seed)
    B = WORLD * B_LOCAL
    case = dict(
        q=torch.randn(B, H, NQ, D, generator=g, dtype=dtype),
        k=torch.randn(B, H, NK, D, generator=g, dtype=dtype),
        v=torch.randn(B, H, NK, D, generator=g, dtype=dtype),
        mix_weight=torch.randn(H, H, generator=g, dtype=dtype),
        mix_bias=0.1 * torch.randn(H, generator=g, dtype=dtype),
        norm_weight=1 + 0.2 * torch.randn(H, generator=g, dtype=dtype),
        norm_bias=0.1 * torch.randn(H, generator=g, dtype=dtype),
        cotangent=torch.randn(B, H, NQ, D, generator=g, dtype=dtype),
        running_mean=0.05 * torch.rand(H, generator=g, dtype=dtype),
        running_var=1 + 0.1 * torch.rand(H, generator=g, dtype=dtype),
    )
    if masked:
        mask = torch.rand(B, 1, NQ, NK, generator=g) > 0.3
        mask[:, :, :, 0] = True
        mask[1, :, 2, :] = False  # one fully masked query row
        case["attn_mask"] = mask
    return case


GRAD_INPUTS = ("q", "k", "v")
GRAD_PARAMS = ("mix_weight", "mix_bias", "norm_weight", "norm_bias")


def run_functional(case, rank=None, sync_group=None):
    """re_attention on the whole batch (rank None) or on rank's slice; outputs and gradients."""
    sl = slice(None) if rank is None else slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    inputs = {n: case[n][sl].clone().requires_grad_() for n in GRAD_INPUTS}
    params = {n: case[n].clone().requires_grad_() for n in GRAD_PARAMS}
    rm, rv = case["running_mean"].clone(), case["running_var"].clone()
    mask = case.get("attn_mask")
    out = reattn.re_attention(
        inputs["q"], inputs["k"], inputs["v"], params["mix_weight"], params["mix_bias"], norm="batch",
        norm_weight=params["norm_weight"], norm_bias=params["norm_bias"], running_mean=rm, running_var=rv,
        training=True, momentum=0.3, attn_mask=None if mask is None else mask[sl], out_scale=0.7,
        sync_group=sync_group,
    )
    (out * case["cotangent"][sl]).sum().backward()
    result = {"out": out.detach(), "running_mean": rm, "running_var": rv}
    result.update({f"grad_{n}": t.grad for n, t in inputs.items()})
    result.update({f"grad_{n}": t.grad for n, t in params.items()})
    return result


def module_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = reattn.ReAttention(DIM, HEADS, qkv_bias=True, backend="eager").double()
    with torch.no_grad():
        module.var_norm.weight.uniform_(0.5, 1.5)
        module.var_norm.bias.uniform_(-0.2, 0.2)
    xs = [torch.randn(WORLD * B_LOCAL, TOKENS, DIM, generator=g, dtype=torch.float64) for _ in range(2)]
    cots = [torch.randn(WORLD * B_LOCAL, TOKENS, DIM, generator=g, dtype=torch.float64) for _ in range(2)]
    return module, xs, cots


def run_module(module, xs, cots, rank=None):
    """Two training steps' forward/backward (no optimizer): outputs, input and parameter gradients."""
    sl = slice(None) if rank is None else slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    module.train()
    result = {}
    for step, (x, cot) in enumerate(zip(xs, cots)):
        x = x[sl].clone().requires_grad_()
        out = module(x)
        (out * cot[sl]).sum().backward()
        result[f"out{step}"] = out.detach()
        result[f"grad_x{step}"] = x.grad
    result.update({f"grad.{n}": p.grad.clone() for n, p in module.named_parameters()})
    result.update({f"buffer.{n}": b.clone() for n, b in module.named_buffers()})
    return result


class DDPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = reattn.ReAttention(DIM, HEADS, qkv_bias=True, backend="auto")
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):
        return self.head(self.attn(x).mean(dim=1))


def ddp_case(seed=0):
    torch.manual_seed(seed)
    net = DDPNet().double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(WORLD * B_LOCAL, TOKENS, DIM, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (WORLD * B_LOCAL,), generator=g)
    return net, x, y


def ddp_steps(model, net, x, y, rank=None, steps=2):
    """SGD steps with the mean cross-entropy of the local batch (DDP averages the gradients)."""
    sl = slice(None) if rank is None else slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[sl]), y[sl])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    return state, losses


# ----------------------------------------------------------------------------- the workers

def _worker(rank, init_file, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        world = dist.group.WORLD
        res = {}
        for name, dtype, masked in (("f64", torch.float64, False), ("f64_masked", torch.float64, True),
                                    ("f32", torch.float32, False)):
            res[name] = run_functional(functional_case(dtype, masked=masked), rank, sync_group=world)
        res["local"] = run_functional(functional_case(torch.float64), rank, sync_group=None)

        # all_reduce_sum packs several tensors into one collective and is differentiable.
        a = torch.full((2,), float(rank + 1), dtype=torch.float64, requires_grad=True)
        b = torch.full((3,), float(10 * (rank + 1)), dtype=torch.float64, requires_grad=True)
        sa, sb = all_reduce_sum([a, b], world)
        ((rank + 1) * sa.sum() + sb.sum()).backward()
        res["allreduce"] = dict(sa=sa.detach(), sb=sb.detach(), ga=a.grad, gb=b.grad)

        module, xs, cots = module_case()
        module.sync_stats = True
        res["module"] = run_module(module, xs, cots, rank)

        module, xs, cots = module_case()
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(module))
        assert isinstance(converted[0].var_norm, nn.SyncBatchNorm)
        res["module_syncbn"] = run_module(converted[0], xs, cots, rank)

        module, xs, cots = module_case()
        converted = convert_sync_reattention(nn.Sequential(module))
        assert converted[0].sync_stats
        res["module_converted"] = run_module(converted[0], xs, cots, rank)

        net, x, y = ddp_case()
        convert_sync_reattention(net)
        model = nn.parallel.DistributedDataParallel(net)
        state, losses = ddp_steps(model, net, x, y, rank)
        res["ddp"] = dict(state=state, losses=losses)

        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    start = time.perf_counter()
    mp.spawn(_worker, args=(str(out_dir / "init"), str(out_dir)), nprocs=WORLD, join=True)
    print(f"2-process gloo run: {time.perf_counter() - start:.1f} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _cat(ranks, case, key):
    return torch.cat([r[case][key] for r in ranks])


TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-5)}


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name, dtype, masked", [("f64", torch.float64, False), ("f64_masked", torch.float64, True),
                                                 ("f32", torch.float32, False)])
def test_functional_matches_one_process_on_the_concatenated_batch(ranks, name, dtype, masked):
    ref = run_functional(functional_case(dtype, masked=masked))
    tol = TOL[dtype]
    for key in ("out", "grad_q", "grad_k", "grad_v"):
        torch.testing.assert_close(_cat(ranks, name, key), ref[key], **tol, msg=f"{name}: {key}")
    for n in GRAD_PARAMS:  # each rank holds the gradient of its own entries' share
        key = f"grad_{n}"
        torch.testing.assert_close(ranks[0][name][key] + ranks[1][name][key], ref[key], **tol, msg=f"{name}: {key}")
    for key in ("running_mean", "running_var"):
        for r in ranks:
            torch.testing.assert_close(r[name][key], ref[key], **tol, msg=f"{name}: {key}")


def test_local_statistics_differ(ranks):
    """The comparison above can fail: without sync_group each rank normalizes with its own statistics."""
    ref = run_functional(functional_case(torch.float64))
    assert not torch.allclose(_cat(ranks, "local", "out"), ref["out"], rtol=1e-6, atol=1e-8)
    # (The mean is W 1/Nk + c on every rank without masks: softmax rows sum to one. The variance differs.)
    assert not torch.allclose(ranks[0]["local"]["running_var"], ranks[1]["local"]["running_var"])


def test_all_reduce_sum_packs_and_differentiates(ranks):
    for r in ranks:
        got = r["allreduce"]
        torch.testing.assert_close(got["sa"], torch.full((2,), 3.0, dtype=torch.float64))
        torch.testing.assert_close(got["sb"], torch.full((3,), 30.0, dtype=torch.float64))
        # d/da_r of sum over ranks of (rank+1) * sum(sa) = 1 + 2
        torch.testing.assert_close(got["ga"], torch.full((2,), 3.0, dtype=torch.float64))
        torch.testing.assert_close(got["gb"], torch.full((3,), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("name", ["module", "module_syncbn", "module_converted"])
def test_module_matches_one_process(ranks, name):
    module, xs, cots = module_case()
    ref = run_module(module, xs, cots)
    tol = TOL[torch.float64]
    for key in ("out0", "grad_x0", "out1", "grad_x1"):
        torch.testing.assert_close(_cat(ranks, name, key), ref[key], **tol, msg=f"{name}: {key}")
    for key in ref:
        if key.startswith("grad."):
            torch.testing.assert_close(ranks[0][name][key] + ranks[1][name][key], ref[key], **tol, msg=key)
        elif key.startswith("buffer."):
            for r in ranks:
                torch.testing.assert_close(r[name][key], ref[key], **tol, msg=key)
    assert int(ranks[0][name]["buffer.var_norm.num_batches_tracked"]) == 2


def test_ddp_steps_match_one_process(ranks):
    net, x, y = ddp_case()
    state, losses = ddp_steps(net, net, x, y)
    for key, value in state.items():
        for r in ranks:
            torch.testing.assert_close(r["ddp"]["state"][key], value, rtol=1e-9, atol=1e-11, msg=key)
    # The mean of the ranks' local losses is the loss of the whole batch.
    for step, loss in enumerate(losses):
        mean = sum(r["ddp"]["losses"][step] for r in ranks) / WORLD
        torch.testing.assert_close(mean, loss, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- single process

def test_fused_backends_refuse_synced_statistics():
    problem = Problem(torch.device("cuda"), heads=4, head_dim=16, norm="batch", batchnorm_training=True,
                      synced_stats=True)
    for backend in ("triton", "cuda", "cpu"):
        reason = unavailable_reason(backend, problem)
        assert reason is not None and "synchronized across processes" in reason, (backend, reason)
        with pytest.raises(ValueError, match="synchronized across processes"):
            resolve_backend(backend, problem)
    assert unavailable_reason("eager", problem) is None
    assert resolve_backend("auto", problem) == "eager"


def test_sync_group_needs_torch_distributed():
    if dist.is_available() and dist.is_initialized():  # pragma: no cover - the test process never initializes
        pytest.skip("torch.distributed is initialized in this process")
    case = functional_case(torch.float64)
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        reattn.re_attention(case["q"], case["k"], case["v"], case["mix_weight"], norm="batch", training=True,
                            sync_group=object())
    # Outside training-mode BatchNorm the argument is ignored (like nn.SyncBatchNorm in eval).
    out = reattn.re_attention(case["q"], case["k"], case["v"], case["mix_weight"], norm="none",
                              sync_group=object())
    assert out.shape == case["q"].shape


def test_module_without_torch_distributed_keeps_local_statistics():
    """sync_stats=True in one process (torch.distributed not initialized) equals plain BatchNorm."""
    module, xs, cots = module_case()
    ref = run_module(module, xs, cots)
    module, xs, cots = module_case()
    module.sync_stats = True
    assert group_size() == 1
    got = run_module(module, xs, cots)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0, msg=key)
