"""BatchNorm statistics across processes: 2 gloo processes on CPU against one process on the whole batch.

One spawn (2 processes, world size 2), once per test session in a background job started at collection
(``job``), runs every case, for every backend: eager, the fused CPU
backend and the two GPU-style fused backends (backend="cpu", "triton", "cuda": Gram-matrix sums
all-reduced in the forward, the BatchNorm backward's two sums in the backward; without a GPU the
Triton kernels run in Triton's interpreter and the CUDA programs in their host emulator, switched
on by tests/conftest.py in the session's environment, which the job and its spawned processes inherit
before they import reattn: hence the tiny shapes); each rank writes its outputs, input gradients, parameter gradients and
running statistics to a file, and the tests compare them with a single process running the
concatenated batch with the same backend: outputs and input gradients slice by slice, parameter
gradients summed over ranks (DDP averages them: the test divides), running statistics equal on
both ranks.
"""
import dataclasses
import os
import re
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import reattn
from reattn._extension import _C
from reattn.backends import Problem, resolve_backend, unavailable_reason
from reattn.distributed import all_reduce_sum, convert_sync_reattention, gram_batch_statistics, group_size
from tests._background import Background, jobs_dir
from tests._tolerance import mix_bias_term_size, reduction_length, rounding_bound

WORLD = 2
B_LOCAL = 2
H, NQ, NK, D = 3, 5, 6, 4
DIM, HEADS, TOKENS = 16, 4, 7

HAS_CPU_KERNEL = _C is not None and hasattr(_C, "re_attention_cpu_gram_sums")
FUSED = ("cpu", "triton", "cuda")  # the backends with kernels of their own (sweeps run in separate steps)
GPU_STYLE = ("triton", "cuda")     # their training BatchNorm needs one mask for all heads
# Why a backend cannot run this file's synchronized cases on CPU tensors here (None: it can). The
# Triton and CUDA ones need TRITON_INTERPRET=1 / REATTN_CUDA_EMULATE=1 without a GPU (conftest).
UNAVAILABLE = {name: unavailable_reason(name, Problem(
    torch.device("cpu"), heads=H, head_dim=D, norm="batch", batchnorm_training=True, masked=True, dropout=True,
    synced_stats=True, needs_grad=True, dtype=torch.float64)) for name in ("eager",) + FUSED}
BACKENDS = tuple(name for name, reason in UNAVAILABLE.items() if reason is None)


def needs(backend):
    return pytest.mark.skipif(UNAVAILABLE[backend] is not None,
                              reason=f"backend={backend!r} cannot run here: {UNAVAILABLE[backend]}")


needs_cpu_kernel = needs("cpu")


# ----------------------------------------------------------------------------- shared cases

def functional_case(dtype, seed=0, masked=False):
    """Global tensors of a functional case (identical in every process: same seed).

    masked: False, True (a bool mask shared by the heads), "float" (a float mask shared by the heads,
    -inf where masked) or "per-head" (a float mask with -inf entries that differ per head: each
    head's statistics run over its own entries).
    """
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
    if masked == "per-head":
        mask = 0.5 * torch.randn(B, H, NQ, NK, generator=g, dtype=dtype)
        mask[torch.rand(B, H, NQ, NK, generator=g) < 0.3] = float("-inf")
        mask[..., 0] = 0.0
        mask[1, 2, 3, :] = float("-inf")  # a query row fully masked for one head only
        case["attn_mask"] = mask
    elif masked == "float":
        mask = 0.5 * torch.randn(B, 1, NQ, NK, generator=g, dtype=dtype)
        mask[torch.rand(B, 1, NQ, NK, generator=g) < 0.3] = float("-inf")
        mask[..., 0] = 0.0
        mask[2, :, 4, :] = float("-inf")  # a fully masked query row (rank 1's slice)
        case["attn_mask"] = mask
    elif masked:
        mask = torch.rand(B, 1, NQ, NK, generator=g) > 0.3
        mask[:, :, :, 0] = True
        mask[1, :, 2, :] = False  # one fully masked query row
        case["attn_mask"] = mask
    return case


def few_entries_case(query_rows):
    """A float64 case whose bool mask keeps key 0 of one query row, in the first batch element of each rank's
    slice that ``query_rows`` names (one entry per listed rank; the other ranks keep nothing)."""
    case = functional_case(torch.float64)
    mask = torch.zeros(WORLD * B_LOCAL, 1, NQ, NK, dtype=torch.bool)
    for rank, row in enumerate(query_rows):
        mask[rank * B_LOCAL, 0, row, 0] = True
    case["attn_mask"] = mask
    return case


GRAD_INPUTS = ("q", "k", "v")
GRAD_PARAMS = ("mix_weight", "mix_bias", "norm_weight", "norm_bias")


def run_functional(case, rank=None, sync_group=None, backend="eager", dropout_p=0.0, compiled=False):
    """re_attention on the whole batch (rank None) or on rank's slice; outputs and gradients.

    compiled: call re_attention through torch.compile (aot_eager; graph breaks allowed, as collectives
    and the data-dependent count check need them).
    """
    sl = slice(None) if rank is None else slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    inputs = {n: case[n][sl].clone().requires_grad_() for n in GRAD_INPUTS}
    params = {n: case[n].clone().requires_grad_() for n in GRAD_PARAMS}
    rm, rv = case["running_mean"].clone(), case["running_var"].clone()
    mask = case.get("attn_mask")
    fn = torch.compile(reattn.re_attention, backend="aot_eager") if compiled else reattn.re_attention
    out = fn(
        inputs["q"], inputs["k"], inputs["v"], params["mix_weight"], params["mix_bias"], norm="batch",
        norm_weight=params["norm_weight"], norm_bias=params["norm_bias"], running_mean=rm, running_var=rv,
        training=True, momentum=0.3, attn_mask=None if mask is None else mask[sl], out_scale=0.7,
        sync_group=sync_group, backend=backend, dropout_p=dropout_p,
    )
    (out * case["cotangent"][sl]).sum().backward()
    result = {"out": out.detach(), "running_mean": rm, "running_var": rv}
    result.update({f"grad_{n}": t.grad for n, t in inputs.items()})
    result.update({f"grad_{n}": t.grad for n, t in params.items()})
    return result


def module_case(seed=0, backend="eager"):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = reattn.ReAttention(DIM, HEADS, qkv_bias=True, backend=backend).double()
    with torch.no_grad():
        module.var_norm.weight.uniform_(0.5, 1.5)
        module.var_norm.bias.uniform_(-0.2, 0.2)
    xs = [torch.randn(WORLD * B_LOCAL, TOKENS, DIM, generator=g, dtype=torch.float64) for _ in range(2)]
    cots = [torch.randn(WORLD * B_LOCAL, TOKENS, DIM, generator=g, dtype=torch.float64) for _ in range(2)]
    return module, xs, cots


def run_module(module, xs, cots, rank=None):
    """Two training steps' forward/backward (no optimizer): outputs, input and parameter gradients.

    The whole-batch run (rank None) also returns "mix_bias_terms": sum over both steps of max_g
    sum_e |dM_g,e| of the re-attention core, the size of the terms whose sum d mix_bias (exactly 0 under
    training BatchNorm) is, from a float64 recomputation on the core's inputs q, k, v and dO."""
    sl = slice(None) if rank is None else slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    module.train()
    result = {}
    seen = {}

    def keep_core_grad(_, args):
        args[0].register_hook(lambda g: seen.update(do=g))

    hooks = [] if rank is not None else [
        module.qkv.register_forward_hook(lambda m, args, out: seen.update(qkv=out.detach())),
        module.proj.register_forward_pre_hook(keep_core_grad),
    ]
    terms = 0.0
    try:
        for step, (x, cot) in enumerate(zip(xs, cots)):
            x = x[sl].clone().requires_grad_()
            out = module(x)
            (out * cot[sl]).sum().backward()
            result[f"out{step}"] = out.detach()
            result[f"grad_x{step}"] = x.grad
            if hooks:
                Bn, N, _ = x.shape
                Hh, Dh = module.num_heads, module.head_dim
                q, k, v = seen["qkv"].reshape(Bn, N, 3, Hh, Dh).permute(2, 0, 3, 1, 4)
                grad_core = seen["do"].reshape(Bn, N, Hh, Dh).transpose(1, 2)
                terms += mix_bias_term_size(q, k, v, module.reatten_matrix.weight.view(Hh, Hh),
                                            module.reatten_matrix.bias, grad_core, scale=module.scale,
                                            norm="batch", training=True, gamma=module.var_norm.weight.detach(),
                                            beta=module.var_norm.bias.detach(), out_scale=module.reatten_scale)
    finally:
        for hook in hooks:
            hook.remove()
    result.update({f"grad.{n}": p.grad.clone() for n, p in module.named_parameters()})
    result.update({f"buffer.{n}": b.clone() for n, b in module.named_buffers()})
    if hooks:
        result["mix_bias_terms"] = terms
    return result


class DDPNet(nn.Module):
    def __init__(self, backend="eager"):
        super().__init__()
        self.attn = reattn.ReAttention(DIM, HEADS, qkv_bias=True, backend=backend)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):
        return self.head(self.attn(x).mean(dim=1))


def ddp_case(seed=0, backend="eager"):
    torch.manual_seed(seed)
    net = DDPNet(backend).double()
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

FUNCTIONAL_CASES = (("f64", torch.float64, False), ("f64_masked", torch.float64, True),
                    ("f64_float_mask", torch.float64, "float"), ("f64_per_head_mask", torch.float64, "per-head"),
                    ("f32", torch.float32, False))


def functional_cases(backend):
    """The cases of FUNCTIONAL_CASES that ``backend`` runs synchronized (the others: see _backend_cases)."""
    # eager: its per-entry sums do not care which entries a head has (nothing new to see per head);
    # triton/cuda: refuse training BatchNorm with per-head masks, synchronized or not.
    return [case for case in FUNCTIONAL_CASES if case[2] != "per-head" or backend == "cpu"]


def _backend_cases(backend, rank, world, own_group):
    res = {}
    for name, dtype, masked in functional_cases(backend):
        res[name] = run_functional(functional_case(dtype, masked=masked), rank, sync_group=world, backend=backend)
    res["local"] = run_functional(functional_case(torch.float64), rank, sync_group=None, backend=backend)
    if backend in GPU_STYLE:
        # Refused before any collective, on every rank alike, with the local path's reason.
        try:
            run_functional(functional_case(torch.float64, masked="per-head"), rank, sync_group=world, backend=backend)
            res["per_head_error"] = None
        except ValueError as error:
            res["per_head_error"] = str(error)
    if backend in FUSED:
        res["f64_masked_compiled"] = run_functional(functional_case(torch.float64, masked=True), rank,
                                                    sync_group=world, backend=backend, compiled=True)
        # Synchronizing over a group of one process runs the synchronized code path (Gram sweep, given
        # statistics, given backward sums) and must equal local statistics, dropout (same seed) included.
        masks = (("own_group", True), ("own_group_per_head", "per-head"))
        for name, masked in masks if backend == "cpu" else (("own_group", True), ("own_group_float", "float")):
            case = functional_case(torch.float64, masked=masked)
            torch.manual_seed(11)
            synced = run_functional(case, rank, sync_group=own_group, backend=backend, dropout_p=0.2)
            torch.manual_seed(11)
            local = run_functional(case, rank, sync_group=None, backend=backend, dropout_p=0.2)
            res[name] = dict(synced=synced, local=local)
        # The count is global: one unmasked entry per process normalizes (two in all); one in all is
        # refused on every rank alike (nobody waits in a collective the other skipped).
        res["one_entry_each"] = run_functional(few_entries_case((0, 0)), rank, sync_group=world, backend=backend)
        try:
            run_functional(few_entries_case((0,)), rank, sync_group=world, backend=backend)
            res["one_entry_error"] = None
        except ValueError as error:
            res["one_entry_error"] = str(error)

    module, xs, cots = module_case(backend=backend)
    module.sync_stats = True
    res["module"] = run_module(module, xs, cots, rank)

    module, xs, cots = module_case(backend=backend)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(module))
    assert isinstance(converted[0].var_norm, nn.SyncBatchNorm)
    res["module_syncbn"] = run_module(converted[0], xs, cots, rank)

    module, xs, cots = module_case(backend=backend)
    converted = convert_sync_reattention(nn.Sequential(module))
    assert converted[0].sync_stats
    res["module_converted"] = run_module(converted[0], xs, cots, rank)

    net, x, y = ddp_case(backend=backend)
    convert_sync_reattention(net)
    model = nn.parallel.DistributedDataParallel(net)
    state, losses = ddp_steps(model, net, x, y, rank)
    res["ddp"] = dict(state=state, losses=losses)
    return res


def _worker(rank, init_file, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        world = dist.group.WORLD
        # new_group is collective: every rank creates every one-process group, each keeps its own.
        own_group = [dist.new_group([r]) for r in range(WORLD)][rank]
        res = {}
        # all_reduce_sum packs several tensors into one collective and is differentiable.
        a = torch.full((2,), float(rank + 1), dtype=torch.float64, requires_grad=True)
        b = torch.full((3,), float(10 * (rank + 1)), dtype=torch.float64, requires_grad=True)
        sa, sb = all_reduce_sum([a, b], world)
        ((rank + 1) * sa.sum() + sb.sum()).backward()
        res["allreduce"] = dict(sa=sa.detach(), sb=sb.detach(), ga=a.grad, gb=b.grad)

        for backend in BACKENDS:
            start = time.perf_counter()
            res[backend] = _backend_cases(backend, rank, world, own_group)
            res[backend]["seconds"] = time.perf_counter() - start

        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(out_dir: str) -> None:
    """The 2-process run: rank<r>.pt in ``out_dir`` for each rank (the processes inherit this environment).

    Forked, not spawned: this process has imported torch, reattn and this module and run nothing yet, so each
    rank starts from that state instead of importing them again (the run: 31.0 -> 25.0 CPU-s, measured on the
    dev machine)."""
    start = time.perf_counter()
    mp.start_processes(_worker, args=(os.path.join(out_dir, "init"), out_dir), nprocs=WORLD, join=True,
                       start_method="fork")
    rank0 = torch.load(os.path.join(out_dir, "rank0.pt"), weights_only=False)
    per_backend = ", ".join(f"{b} {rank0[b]['seconds']:.1f} s" for b in BACKENDS)
    print(f"2-process gloo run: {time.perf_counter() - start:.1f} s (rank 0: {per_backend})")


_JOB = None


def job():
    """The 2-process run as a background job (tests/_background.py): started at collection by tests/conftest.py,
    so it runs once per session, not once per pytest-xdist worker that runs a test of this file, and overlaps
    the tests before this file. It runs Triton's kernels in the interpreter when this session does."""
    global _JOB
    if _JOB is None:
        out_dir = os.path.join(jobs_dir(), "distributed")
        os.makedirs(out_dir, exist_ok=True)

        def parse(returncode, out, err):
            if returncode != 0:
                raise RuntimeError(f"the 2-process run failed (exit status {returncode}):\n{err}")
            print(out.strip())
            return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]

        interpret = {k: os.environ[k] for k in ("TRITON_INTERPRET",) if k in os.environ}
        _JOB = Background("tests.test_distributed", out_dir, parse=parse, env=interpret, name="distributed")
    return _JOB


@pytest.fixture(scope="module")
def ranks():
    return job().results(timeout=1800)


def _cat(ranks, case, key, backend="eager"):
    return torch.cat([r[backend][case][key] for r in ranks])


# float64: 1e-9 relative is 10^7 ulps, far above the rounding bound (~1e-14 of the magnitudes here) and
# any conditioning of these small cases. float32: twice the rounding bound of the op's reductions
# (tests/_tolerance.py) relative to the largest entry of each result: the two sides' errors add up.
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11)}
N_REDUCTION = reduction_length(WORLD * B_LOCAL, H, NQ, NK, D)


def tol_for(dtype, reference):
    if dtype == torch.float64:
        return TOL[dtype]
    return dict(rtol=0.0, atol=2 * rounding_bound(dtype, N_REDUCTION, reference.abs().max().item()))


def mix_bias_tol(case, dtype):
    """d mix_bias is 0 in exact arithmetic under training BatchNorm (the batch mean absorbs c): each side is
    the rounding noise of a sum over the entries of dM, so the bound scales with the size of those terms,
    sum |dM| (tests/_tolerance.py), not with the (zero) result; the two sides' noises add up."""
    B = WORLD * B_LOCAL
    terms = mix_bias_term_size(case["q"], case["k"], case["v"], case["mix_weight"], case["mix_bias"],
                               case["cotangent"], norm="batch", training=True, gamma=case["norm_weight"],
                               beta=case["norm_bias"], out_scale=0.7, attn_mask=case.get("attn_mask"))
    return dict(rtol=0.0, atol=2 * rounding_bound(dtype, reduction_length(B, H, NQ, NK, D), terms))


def assert_matches_one_process(ranks, backend, name, ref, dtype, case):
    """Case ``name`` of the 2-process run equals ``ref``, one process on the concatenated batch ``case``:
    each rank's rows of out and grad_q/k/v concatenated, the ranks' parameter-gradient shares summed, and
    every rank's running statistics."""
    for key in ("out", "grad_q", "grad_k", "grad_v"):
        torch.testing.assert_close(_cat(ranks, name, key, backend), ref[key], **tol_for(dtype, ref[key]),
                                   msg=f"{name}: {key}")
    for n in GRAD_PARAMS:  # each rank holds the gradient of its own entries' share
        key = f"grad_{n}"
        got = sum(r[backend][name][key] for r in ranks)
        torch.testing.assert_close(got, ref[key], **mix_bias_tol(case, dtype) if n == "mix_bias" else
                                   tol_for(dtype, ref[key]), msg=f"{name}: {key}")
    for key in ("running_mean", "running_var"):
        for r in ranks:
            torch.testing.assert_close(r[backend][name][key], ref[key], **tol_for(dtype, ref[key]),
                                       msg=f"{name}: {key}")


# ----------------------------------------------------------------------------- tests

backends = pytest.mark.parametrize("backend", [pytest.param(name, marks=needs(name)) for name in ("eager",) + FUSED])
fused_backends = pytest.mark.parametrize("backend", [pytest.param(name, marks=needs(name)) for name in FUSED])


@pytest.mark.parametrize("backend, name, dtype, masked", [
    pytest.param(backend, *case, marks=needs(backend), id=f"{backend}-{case[0]}")
    for backend in ("eager",) + FUSED for case in functional_cases(backend)])
def test_functional_matches_one_process_on_the_concatenated_batch(ranks, backend, name, dtype, masked):
    case = functional_case(dtype, masked=masked)
    ref = run_functional(case, backend=backend)
    assert_matches_one_process(ranks, backend, name, ref, dtype, case)


@backends
def test_local_statistics_differ(ranks, backend):
    """The comparison above can fail: without sync_group each rank normalizes with its own statistics."""
    ref = run_functional(functional_case(torch.float64), backend=backend)
    assert not torch.allclose(_cat(ranks, "local", "out", backend), ref["out"], rtol=1e-6, atol=1e-8)
    # (The mean is W 1/Nk + c on every rank without masks: softmax rows sum to one. The variance differs.)
    assert not torch.allclose(ranks[0][backend]["local"]["running_var"], ranks[1][backend]["local"]["running_var"])


@fused_backends
def test_synchronized_statistics_under_torch_compile(ranks, backend):
    case = functional_case(torch.float64, masked=True)
    ref = run_functional(case, backend=backend)
    assert_matches_one_process(ranks, backend, "f64_masked_compiled", ref, torch.float64, case)


# Every backend words the refusal per head (Hm = 1 here: one count, expanded to the three heads).
COUNT_WORDING = r"unmasked counts per head: \[1, 1, 1\]"


@fused_backends
def test_synchronized_counts_are_global(ranks, backend):
    # One unmasked entry on each process: the global count 2 normalizes (locally 1 would be refused).
    case = few_entries_case((0, 0))
    ref = run_functional(case, backend=backend)
    assert_matches_one_process(ranks, backend, "one_entry_each", ref, torch.float64, case)
    with pytest.raises(ValueError, match=f"more than one unmasked value per head; {COUNT_WORDING}$"):
        run_functional(few_entries_case((0,)), rank=0, backend=backend)  # what one process alone refuses
    for r in ranks:
        error = r[backend]["one_entry_error"]
        assert error is not None, "one unmasked entry over all processes was not refused"
        assert error.startswith("re_attention: norm='batch' in training needs more than one unmasked value per head "
                                "over all processes; "), error
        assert re.search(COUNT_WORDING + "$", error), error


@pytest.mark.parametrize("backend, name", [
    pytest.param(backend, name, marks=needs(backend), id=f"{backend}-{name}")
    for backend in FUSED
    for name in (("own_group", "own_group_per_head") if backend == "cpu" else ("own_group", "own_group_float"))])
def test_synchronized_path_over_one_process_equals_local_statistics(ranks, backend, name):
    """Masks (shared, per head for cpu) and dropout: the Gram-sum path equals the local path to fp64 round-off."""
    for r in ranks:
        synced, local = r[backend][name]["synced"], r[backend][name]["local"]
        assert synced.keys() == local.keys()
        for key in local:
            torch.testing.assert_close(synced[key], local[key], **TOL[torch.float64], msg=f"{name}: {key}")


def test_all_reduce_sum_packs_and_differentiates(ranks):
    for r in ranks:
        got = r["allreduce"]
        torch.testing.assert_close(got["sa"], torch.full((2,), 3.0, dtype=torch.float64))
        torch.testing.assert_close(got["sb"], torch.full((3,), 30.0, dtype=torch.float64))
        # d/da_r of sum over ranks of (rank+1) * sum(sa) = 1 + 2
        torch.testing.assert_close(got["ga"], torch.full((2,), 3.0, dtype=torch.float64))
        torch.testing.assert_close(got["gb"], torch.full((3,), 2.0, dtype=torch.float64))


@backends
@pytest.mark.parametrize("name", ["module", "module_syncbn", "module_converted"])
def test_module_matches_one_process(ranks, backend, name):
    module, xs, cots = module_case(backend=backend)
    ref = run_module(module, xs, cots)
    tol = TOL[torch.float64]
    for key in ("out0", "grad_x0", "out1", "grad_x1"):
        torch.testing.assert_close(_cat(ranks, name, key, backend), ref[key], **tol, msg=f"{name}: {key}")
    n = reduction_length(WORLD * B_LOCAL, HEADS, TOKENS, TOKENS, DIM // HEADS)
    for key in ref:
        if key.startswith("grad."):
            got = ranks[0][backend][name][key] + ranks[1][backend][name][key]
            # d reatten_matrix.bias: rounding noise around 0 on both sides (see mix_bias_tol)
            key_tol = (dict(rtol=0.0, atol=2 * rounding_bound(torch.float64, n, ref["mix_bias_terms"]))
                       if key == "grad.reatten_matrix.bias" else tol)
            torch.testing.assert_close(got, ref[key], **key_tol, msg=key)
        elif key.startswith("buffer."):
            for r in ranks:
                torch.testing.assert_close(r[backend][name][key], ref[key], **tol, msg=key)
    assert int(ranks[0][backend][name]["buffer.var_norm.num_batches_tracked"]) == 2


@backends
def test_ddp_steps_match_one_process(ranks, backend):
    net, x, y = ddp_case(backend=backend)
    state, losses = ddp_steps(net, net, x, y)
    for key, value in state.items():
        for r in ranks:
            torch.testing.assert_close(r[backend]["ddp"]["state"][key], value, rtol=1e-9, atol=1e-11, msg=key)
    # The mean of the ranks' local losses is the loss of the whole batch.
    for step, loss in enumerate(losses):
        mean = sum(r[backend]["ddp"]["losses"][step] for r in ranks) / WORLD
        torch.testing.assert_close(mean, loss, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- single process

@pytest.mark.parametrize("backend", [pytest.param(name, marks=needs(name)) for name in GPU_STYLE])
def test_gpu_style_backends_refuse_per_head_masks_when_synchronized(ranks, backend):
    """The fused Triton/CUDA statistics sweep shares one mask across heads, synchronized or not: same refusal."""
    for r in ranks:
        error = r[backend]["per_head_error"]
        assert error is not None, "a per-head mask with synchronized training BatchNorm was not refused"
        assert f"backend={backend!r} cannot run" in error and "attn_mask that differs per head" in error, error
        assert "give the mask a head dim of 1" in error, error


@pytest.mark.parametrize("backend", GPU_STYLE)
def test_gpu_style_backends_accept_synced_statistics(backend):
    problem = Problem(torch.device("cuda"), heads=4, head_dim=16, norm="batch", batchnorm_training=True,
                      masked=True, dropout=True, synced_stats=True, needs_grad=True, dtype=torch.float32)
    reason = unavailable_reason(backend, problem)
    if reason is not None:  # what a CUDA tensor needs that this machine may lack (triton, a CUDA build of _C)
        assert "synchron" not in reason, reason
    else:
        assert resolve_backend(backend, problem) == backend
    if unavailable_reason("triton", problem) is None:
        assert resolve_backend("auto", problem) == "triton"  # CUDA tensors: as without synchronization
    per_head = dataclasses.replace(problem, mask_per_head=True)
    reason = unavailable_reason(backend, per_head)
    assert reason is not None and "attn_mask that differs per head" in reason, reason


@needs_cpu_kernel
def test_cpu_backend_accepts_synced_statistics():
    problem = Problem(torch.device("cpu"), heads=4, head_dim=16, norm="batch", batchnorm_training=True,
                      masked=True, mask_per_head=True, synced_stats=True, needs_grad=True, dtype=torch.float32)
    assert unavailable_reason("cpu", problem) is None
    assert resolve_backend("cpu", problem) == "cpu"
    assert resolve_backend("auto", problem) == "cpu"
    # The Triton interpreter would run CPU tensors, synchronized too, but not a per-head mask here.
    reason = unavailable_reason("triton", problem)
    assert reason is not None and "attn_mask that differs per head" in reason, reason


@pytest.mark.parametrize("per_head", [False, True])
def test_gram_batch_statistics_give_the_moments_of_the_mixed_map(per_head):
    """Mean and biased variance of M = W P~ + c over each head's unmasked entries, from Gram sums of two halves."""
    g = torch.Generator().manual_seed(4)
    B, Hh, Nq, Nk = 4, 3, 5, 6
    probs = torch.rand(B, Hh, Nq, Nk, generator=g, dtype=torch.float64) * 0.4  # any P~: dropout, masks
    w = torch.randn(Hh, Hh, generator=g, dtype=torch.float64)
    c = torch.randn(Hh, generator=g, dtype=torch.float64)
    keep = torch.rand(B, Hh if per_head else 1, Nq, Nk, generator=g) > 0.3
    shift = 1.0 / Nk
    m = torch.einsum("gh,bhij->bgij", w, probs) + c.view(1, Hh, 1, 1)
    kept = keep.expand(B, Hh, Nq, Nk)
    n = kept.sum(dim=(0, 2, 3)).double()
    mean = m.masked_fill(~kept, 0).sum(dim=(0, 2, 3)) / n
    var = ((m - mean.view(1, Hh, 1, 1)).masked_fill(~kept, 0) ** 2).sum(dim=(0, 2, 3)) / n

    def sums(part):  # what one process's sweep accumulates
        x = torch.where(keep[part].unsqueeze(2), (probs[part] - shift).unsqueeze(1), 0.0)  # [b, Hm, H, Nq, Nk]
        x = x.transpose(0, 1).transpose(1, 2).reshape(keep.shape[1], Hh, -1)               # [Hm, H, entries]
        return x.sum(-1), x @ x.transpose(-1, -2), keep[part].transpose(0, 1).reshape(keep.shape[1], -1).sum(-1)

    halves = [sums(slice(0, 2)), sums(slice(2, 4))]
    s1, gram, count = (a.double() + b.double() for a, b in zip(*halves))  # the all-reduce
    got_mean, got_var, got_n = gram_batch_statistics(w, c, s1, gram, count, shift)
    torch.testing.assert_close(got_n, n, rtol=0, atol=0)
    torch.testing.assert_close(got_mean, mean, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got_var, var, rtol=1e-12, atol=1e-13)


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


if __name__ == "__main__":  # the background job: python -m tests.test_distributed OUT_DIR
    import sys

    run_ranks(sys.argv[1])
