"""The CUDA side of the static model: the extension's programs, chosen by its planners, emulated from their SASS.

Needs reattn._C built with CUDA (the cubins); without it these skip (the build without CUDA has no
programs to model). The problems are small, so a full emulation is cheap enough to check the
extrapolation over key segments and query chunks the model uses at the benchmark shapes.
"""
import pytest
import torch

from reattn._extension import _C

pytestmark = pytest.mark.skipif(_C is None or not _C.build_info().get("cuda"),
                                reason="reattn._C was built without CUDA: no cubin to model")


PARAMETER_STEPS = ("param_grads", "moments_center", "bn_moments", "bn_coefficients",
                   "running_stats")  # parameters.cuh: one block each


def _launches(steps, parameter_steps=False):
    """Each phase's launches; without ``parameter_steps`` the programs only (not the parameter steps)."""
    from benchmarks import cuda_side

    return {phase: [x for x in items if isinstance(x, cuda_side.Launch)
                    and (parameter_steps or x.program not in PARAMETER_STEPS)] for phase, items in steps.items()}


def test_launches_per_norm_mode_follow_ops_cpp():
    from benchmarks import cuda_side

    B, H, N, D = 2, 3, 40, 16
    shapes = _C.cuda_backward_tiles(H, D, N, N, "bfloat16", cuda_side.shared_limit(90, torch.bfloat16, 2))
    fwd_shape = _C.cuda_forward_tiles(H, D, N, N, "bfloat16", cuda_side.shared_limit(90, torch.bfloat16, 0))
    programs, names = {}, {}
    steps = {}
    for norm in ("none", "batch-eval", "batch-train", "layer"):
        call = cuda_side.cuda_call(B, H, N, D, norm, 90)
        steps[norm] = {phase: [x.program for x in items] for phase, items in _launches(call, True).items()}
        launches = _launches(call)
        programs[norm] = {phase: [x.program for x in items] for phase, items in launches.items()}
        names[norm] = {phase: [x.name for x in items] for phase, items in launches.items()}
        for x in launches["fwd"] + launches["bwd"]:
            assert not x.core and x.threads % 32 == 0 and x.grid[0] % B == 0
            assert x.dynamic_shared > 0 or x.program == "head_affine"
        # The gradients written by one block after the backward (each program folds the parameters itself).
        for x in _launches(call, True)["fwd"] + _launches(call, True)["bwd"]:
            if x.program in PARAMETER_STEPS:  # bn_moments, bn_coefficients: their 2H float64 sums in shared memory
                assert x.grid == (1, 1) and x.threads == 256 and x.one_segment
                assert x.dynamic_shared == (2 * H * 8 if x.program in ("bn_moments", "bn_coefficients") else 0)
        for x in launches["fwd"] + launches["bwd"]:
            if x.program in ("forward", "backward_rows", "backward_keys"):
                assert x.params.fold.H == H and x.params.fold.W.data
        for x in launches.get("infer", []):  # the running statistics as given, no rows of batch statistics
            assert x.params.fold.running_mean.data and x.params.fold.running_var.data and not x.params.fold.bn
        grads = [x for x in _launches(call, True)["bwd"] if x.program == "param_grads"][0]
        # dW, dc, dgamma, dbeta (read back for LayerNorm only), in their parameters' dtypes (float64 where absent);
        # training BatchNorm's full backward leaves dgamma, dbeta out (its sums call's: ops.cpp norm_gradients)
        pieces = 2 if norm == "batch-train" else 4
        assert grads.params.pieces == pieces
        assert list(grads.params.begin)[:pieces] == [0, H * H, H * H + H, H * H + 2 * H][:pieces]
        assert list(grads.params.size)[:pieces] == [H * H, H, H, H][:pieces] and grads.params.storage[0] == \
            cuda_side.STORAGE[torch.float32]
        fwd = launches["fwd"][0]
        assert fwd.grid == (B * fwd_shape["grid"][0], fwd_shape["grid"][1]) and fwd.threads == fwd_shape["threads"]
        assert fwd.dynamic_shared == fwd_shape["shared_bytes"] and fwd.params.vector_loads
        keys = launches["bwd"][-1]
        assert keys.grid == (B * shapes["keys"]["grid"][0], 1) and keys.dynamic_shared == shapes["keys"]["shared_bytes"]
    # Eval-mode BatchNorm's call without gradients ("infer", the fwd rows) is its inference op: one program that
    # folds the norm from the running statistics as given.
    infer = {"batch-eval": {"infer": ["forward"]}}
    for norm in ("none", "batch-eval", "layer"):
        assert steps[norm] == {**infer.get(norm, {}), "fwd": ["forward"],
                               "bwd": ["backward_rows", "backward_keys", "param_grads"]}
    # Training BatchNorm: its statistics from the moments, the running statistics' update and its backward
    # coefficients, one block each (the moments' shift is the forward programs' own: no step).
    assert steps["batch-train"] == {"fwd": ["forward", "bn_moments", "head_affine", "running_stats"],
                                    "bwd": ["head_dot_sums", "bn_coefficients", "backward_rows", "backward_keys",
                                            "param_grads"]}
    for norm in ("none", "batch-eval", "layer"):
        assert programs[norm] == {**infer.get(norm, {}), "fwd": ["forward"], "bwd": ["backward_rows", "backward_keys"]}
    # Training BatchNorm: the one-sweep forward with moments (X V in bf16), then its element-wise finish (O from one
    # read of X V); the backward's BatchNorm sums are one pass over dO, the kept X V and U, then both passes.
    assert programs["batch-train"] == {"fwd": ["forward", "head_affine"],
                                       "bwd": ["head_dot_sums", "backward_rows", "backward_keys"]}
    train = _launches(cuda_side.cuda_call(B, H, N, D, "batch-train", 90))
    affine, sums = train["fwd"][1], train["bwd"][0]
    # The shift -sum_h W[g, h] / N: formed in the forward's fold (no mixing bias given), added back by bn_moments.
    moments_step = _launches(cuda_side.cuda_call(B, H, N, D, "batch-train", 90), True)["fwd"][1]
    assert train["fwd"][0].params.fold.center_scale == -1.0 / N and not train["fwd"][0].params.fold.c.data
    assert moments_step.program == "bn_moments" and moments_step.params.inv_keys == 1.0 / N
    assert moments_step.params.W.data and not moments_step.params.center.data
    assert not affine.params.r_is_acc and affine.grid == (B * H, 1) and affine.params.rows == N
    assert not train["fwd"][0].params.out_is_acc  # the forward writes X V in bf16: 2 bytes per element
    assert sums.params.inv_keys == 1.0 / N and sums.params.stats and sums.params.W.data
    # head_dot_sums' shared memory: the 8 warps' two sums, then U's row (staged: one per (b, h) without a mask) and
    # 7 columns more, wrapped, for the flat walk (one 16-byte item of bf16 is 8 columns)
    assert sums.grid == (B * H, 1) and sums.dynamic_shared == 2 * 8 * 4 + (D + 7) * 4 and sums.params.u_st.n == 0
    # Items of one 16-byte access (8 bf16 columns) in both element-wise passes; U = sum_j V_j in the forward's
    # row-block shares, which head_affine adds (and writes for the backward's sums).
    assert affine.params.vector and sums.params.vector and train["fwd"][0].params.value_sums
    assert affine.params.u_sum and affine.params.u_parts == fwd_shape["grid"][0] and sums.params.u_parts == 1
    # No torch op in the forward: the shift, the count (an argument), U's sum and the running statistics' update
    # are the launches'.
    assert not [x for x in cuda_side.cuda_call(B, H, N, D, "batch-train", 90)["fwd"]
                if not isinstance(x, cuda_side.Launch)]
    assert names["batch-train"]["fwd"][1] == "head_affine_kernel<bfloat16>"
    assert names["batch-train"]["bwd"][0] == "head_dot_sums_kernel<bfloat16>"
    assert not train["bwd"][1].params.stats_only and train["bwd"][1].params.dq
    variant = {norm: names[norm]["fwd"][0].rsplit(", ", 1)[1].rstrip(">") for norm in names}
    assert variant == {"none": "plain_affine", "batch-eval": "plain_affine", "layer": "plain_layer",
                       "batch-train": "plain_moments"}
    # Without mask or dropout, on aligned rows, the backward's plain variants (row_configs.h).
    assert all(n.endswith("plain_backward_rows>>") for n in names["none"]["bwd"][:1])
    assert names["layer"]["bwd"][0].endswith(", plain_layer_backward_rows>>")  # LayerNorm's own, in bf16
    assert names["layer"]["bwd"][1].endswith(", plain_layer>>")
    assert names["none"]["bwd"][1].startswith("key_kernel<KeyConfig<bfloat16, ")
    assert names["none"]["bwd"][1].endswith(", plain>>")


def test_unaligned_head_dims_run_the_plain_variants_on_padded_copies():
    from benchmarks import cuda_side

    # D = 35 (DeepViT-L-384): 70-byte rows. The ladder pads k and v into rows of 40 elements once (padded_rows), the
    # backward reads those views as the autograd saved them and ops.cpp copies q and dO; the plain variants run
    # on the copies, whose first D columns they see. The forward's 48-column program stages q's rows element by
    # element from q itself (ReAttnParams q_by_element); the padding's zeros are kept from an earlier call.
    steps = cuda_side.cuda_call(1, 2, 40, 35, "none", 90)
    copies = {phase: sum(getattr(x, "name", None) == "cat" for x in items) for phase, items in steps.items()}
    assert copies == {"fwd": 2, "bwd": 2}
    assert [getattr(x, "name", None) for x in steps["fwd"][:2]] == ["cat", "cat"] and len(steps["fwd"]) == 3
    launches = _launches(steps)
    (fwd,), (rows, keys) = launches["fwd"], launches["bwd"]
    # D = 35 <= 40 of the 48 columns: the forward's narrow-tail program (rows.cuh NarrowTail).
    assert fwd.name == "forward_kernel<NarrowTail<RowConfig<bfloat16, 2, 4, 3, 48, 48, 64, plain_affine>>>"
    assert rows.name.endswith("plain_backward_rows>>")
    assert keys.name.endswith(", plain>>")
    for launch in (fwd, rows, keys):
        assert launch.params.vector_loads and launch.params.k_st.n == 40
    assert fwd.params.q_by_element and fwd.params.q_st.n == 35
    for launch in (rows, keys):
        assert not launch.params.q_by_element and launch.params.q_st.n == 40
    assert rows.params.do_st.n == 40


def test_head_affine_adds_the_segmented_forwards_shares_of_u():
    # Key segments (N > 224): the plain forward reads the statistics kernel's rows and, with the moments, sums U's
    # shares of its row blocks as the one-segment shapes do (rows.cuh kValueSums); head_affine adds them and writes
    # U once, staging U's one row per (b, h) in shared memory (head_affine.cuh's head_affine_shared), with 7 columns
    # more, wrapped, for the flat walk.
    from benchmarks import cuda_side

    D = 16
    (statistics, fwd, affine) = [x for x in _launches(cuda_side.cuda_call(1, 2, 240, D, "batch-train", 90))["fwd"]]
    assert statistics.program == "statistics" and fwd.params.stats_is_input and fwd.params.value_sums
    assert affine.program == "head_affine" and affine.params.u_sum and affine.params.u_parts == -(-240 // 32)
    assert affine.dynamic_shared == (D + 7) * 4


def test_problems_without_a_tensor_core_plan_run_the_cuda_core_programs():
    from benchmarks import cuda_side

    # Nk > 224: the tensor-core forward sweeps key segments once, after the statistics kernel (128 query rows of
    # one head a program); the backward's row pass sweeps them twice.
    launches = _launches(cuda_side.cuda_call(1, 2, 240, 16, "none", 90))
    (statistics, fwd), (rows, keys) = launches["fwd"], launches["bwd"]
    assert not fwd.core and not fwd.one_segment and fwd.params.stats_is_input
    assert statistics.program == "statistics" and statistics.grid == (2 * 2, 1) and statistics.threads == 128
    assert statistics.name == "statistics_kernel<StatisticsConfig<bfloat16, 4, 2, 48, 1>>" and statistics.unit == 32
    assert not rows.core and rows.program == "backward_rows" and not rows.one_segment and rows.unit == 64
    assert not keys.core and keys.program == "backward_keys"
    # D > 64: no tensor-core shape, the CUDA-core backward.
    (bwd,) = _launches(cuda_side.cuda_call(1, 2, 40, 96, "none", 90))["bwd"]
    assert bwd.core and bwd.program == "backward" and bwd.name == "re_attention_kernel<bfloat16, backward>"
    assert bwd.threads == cuda_side.PROGRAM_THREADS and bwd.grid == (bwd.params.plan.num_m, bwd.params.plan.num_chunks)
    # fp32: the CUDA-core programs throughout.
    launches = _launches(cuda_side.cuda_call(1, 2, 40, 16, "layer", 90, dtype=torch.float32))
    assert [x.name for x in launches["fwd"] + launches["bwd"]] == ["re_attention_kernel<float32, forward>",
                                                                   "re_attention_kernel<float32, backward>"]


def test_functions_are_disassembled_one_at_a_time_as_in_the_whole_cubin():
    """The model disassembles only the functions it reads (``nvdisasm -fun`` by symbol index): each must be the
    function of the whole cubin's disassembly, instruction by instruction (labels are numbered per output)."""
    import re

    from benchmarks import cuda_side, sass

    library = cuda_side.extension_path()
    functions, resources = cuda_side._functions(90, library)
    assert set(functions) == set(resources)
    cubin, names = next((c, r) for c, r in cuda_side._cubins(90, library) if any("row_logsumexp" in n for n in r))
    whole = sass.disassemble(cubin)
    assert len(names) >= 2 and set(whole) == set(names)

    def key(fn):
        return [(i.address, i.guard, i.opcode, re.sub(r"\.L_x_\d+", "L", i.operands), i.location, i.target)
                for i in fn.instructions]

    for name in names:
        assert key(functions[name]) == key(whole[name]) and functions[name].instructions, name
        assert functions[name].banks == sass.constant_banks(cubin, name)
    with pytest.raises(KeyError):
        functions["no_such_function"]


def _full(launch):
    from benchmarks import cuda_side

    return cuda_side._run_at(launch, 90, (0, 0), None)


@pytest.mark.parametrize("program", ["statistics", "forward", "backward_rows", "backward_keys"])
def test_extrapolating_over_the_swept_length_matches_a_full_emulation(program):
    from benchmarks import cuda_side

    # statistics (the kernel a plain forward over key segments launches first): 300 keys = 10 K tiles of 32 (the
    # last partial); forward: 5 segments of 64 (the last partial), reading the statistics; row pass: the same
    # segments, each sweep recomputing their scores; key pass: 83 queries = 6 chunks of 16 (the last partial).
    N = 83 if program == "backward_keys" else 300
    launches = _launches(cuda_side.cuda_call(1, 2, N, 16, "layer", 90))
    launch = [x for x in launches["fwd"] + launches["bwd"] if x.program == program][0]
    counts = cuda_side.program_counts(launch, 90)
    assert not counts.diag.unmodelled
    # Every program here issues the same for its 3rd and 4th unit (the general row pass did not: the model then
    # counts the real length, "full (not linear in the swept length)"), so the model extrapolates, and must land
    # on what the full emulation counts.
    assert counts.method.startswith("extrapolated"), counts.method
    full = _full(launch)
    assert sum(full.issued.values()) == pytest.approx(sum(counts.issued.values()), rel=1e-9)
    for address, n in full.issued.items():
        assert counts.issued.get(address, 0.0) == pytest.approx(n, abs=1e-6), hex(address)


def test_a_program_that_is_not_linear_in_the_swept_length_is_counted_at_its_real_length(monkeypatch):
    from collections import Counter

    from benchmarks import cuda_side, sass_exec

    # Emulations at 2, 3 and 4 units that do not grow by the same counts (no program of today's extension
    # does that; the general row pass once did): the model must count the real length, not extrapolate.
    launch = [x for x in _launches(cuda_side.cuda_call(1, 2, 300, 16, "layer", 90))["bwd"]
              if x.program == "backward_rows"][0]
    unit = launch.unit
    r = 300 - 4 * unit  # the last, partial unit's keys
    issued = {r + unit: 10, r + 2 * unit: 20, r + 3 * unit: 31, None: 57}

    def fake_run_at(launch_, arch, ctaid, length):
        return sass_exec.Counts(issued=Counter({0x100: issued[length]}))

    monkeypatch.setattr(cuda_side, "_run_at", fake_run_at)
    counts = cuda_side.program_counts(launch, 90)
    assert counts.method == "full (not linear in the swept length)"
    assert counts.issued == {0x100: 57}
    issued[r + 3 * unit] = 30  # linear: 10 + (5 - 2) * 10 = 40 at the real 5 units
    counts = cuda_side.program_counts(launch, 90)
    assert counts.method.startswith("extrapolated") and counts.issued == {0x100: pytest.approx(40.0)}


def test_model_of_a_tensor_core_launch():
    from benchmarks import cuda_side, sass
    from benchmarks.cost_model import H100_SXM

    launch = _launches(cuda_side.cuda_call(2, 3, 40, 16, "layer", 90))["fwd"][0]
    model = cuda_side.model_launch(launch, 90)
    functions, resources = cuda_side._functions(90, cuda_side.extension_path())
    assert model.threads == launch.threads and model.registers == resources[launch.symbol].registers
    assert model.spill_bytes == 0
    assert model.shared_bytes == launch.dynamic_shared + resources[launch.symbol].shared_static
    # mma.sync on tensor cores, cp.async staging (global and shared bytes), ldmatrix and quad shuffles.
    assert model.work.instructions["tensor"] > 0 and model.work.instructions["shuffle"] > 0
    assert model.work.l2_bytes > 0 and model.work.shared_bytes > 0
    assert any(k.startswith("HMMA.16816") for k in model.tensor_kinds)
    issued = {ins.base for ins in functions[launch.symbol].instructions}
    assert {"LDGSTS", "LDSM", "SHFL"} <= issued
    assert "no semantics" not in model.note
    # The only decisions on data: storing the row statistics, "is the row max -inf" (every key masked), where
    # "not taken" is the ordinary row.
    unknown = cuda_side.program_counts(launch, 90).diag.unknown_branches
    code = functions[launch.symbol].instructions
    at = {ins.address: i for i, ins in enumerate(code)}
    for address in unknown:
        branch = code[at[address]]
        predicate = branch.guard.lstrip("@!")
        setter = next(ins for ins in reversed(code[:at[address]]) if ins.operands.startswith(predicate + ","))
        assert setter.base == "FSETP" and "-INF" in setter.operands, (branch.text, setter.text)
    t = model.times(H100_SXM)
    assert 0 < t.t_low_us <= t.t_high_us


@pytest.mark.parametrize("H,D", [(12, 32), (6, 64)], ids=["12 heads", "6 heads"])
def test_layer_norm_forward_mixes_heads_on_tensor_cores(H, D):
    # kTensorLayer (rows.cuh mix_in_place_layer): the bf16 plain LayerNorm forward of the one-segment
    # shapes mixes the heads with mma.sync and writes A back over P~ by stmatrix on sm_90 (per 16 keys,
    # one per row wide, one per two rows narrow), by 16-bit stores on sm_80, which has no stmatrix.
    from collections import Counter

    from benchmarks import cuda_side

    per_arch = {}
    for arch in (90, 80):
        launch = _launches(cuda_side.cuda_call(1, H, 64, D, "layer", arch))["fwd"][0]
        assert "plain_layer" in launch.name
        counts = cuda_side.program_counts(launch, arch)
        functions, _ = cuda_side._functions(arch, cuda_side.extension_path())
        issued = Counter()
        for ins in functions[launch.symbol].instructions:
            issued[ins.base] += counts.issued.get(ins.address, 0)
        per_arch[arch] = issued
    tiles = _C.cuda_forward_tiles(H, D, 64, 64, "bfloat16")
    rows_per_store = 1 if tiles["groups"] * tiles["heads"] > 7 else 2  # the narrow shapes: 2
    # Every warp (every slab holds real rows at Nq = 64) stores its rows' A once per 16-key chunk: 4 chunks.
    warps = tiles["slabs"] * tiles["groups"]
    assert per_arch[90]["STSM"] == warps * (16 // tiles["groups"] // rows_per_store) * 4
    assert per_arch[80]["STSM"] == 0 and per_arch[80]["STS"] > 0
    assert per_arch[90]["MUFU"] > 0 and per_arch[90]["HMMA"] > per_arch[90]["STSM"]


@pytest.mark.parametrize("H,D", [(12, 32), (6, 32)], ids=["wide", "narrow"])  # shapes that fit sm_80 too
def test_layer_norm_backward_mixes_heads_on_tensor_cores(H, D):
    # kLayerGrad (rows.cuh grad_mixed_layer): the bf16 LayerNorm row pass recomputes M - mean and writes
    # dM over dN by stmatrix on sm_90 (per 16 keys and sweep, one per row wide, one per two rows
    # narrow), by 16-bit stores on sm_80; its sums across heads are quad shuffles, not exchanges
    # through shared memory. Its key pass (keys.cuh grad_mixed_layer) writes A^T, then dM^T, so per
    # query chunk two stores per key (per two keys narrow). fp16 keeps the plain passes.
    from collections import Counter

    from benchmarks import cuda_side

    per_arch = {}
    for arch in (90, 80):
        rows, keys = _launches(cuda_side.cuda_call(1, H, 64, D, "layer", arch))["bwd"]
        assert rows.name.endswith(", plain_layer_backward_rows>>") and keys.name.endswith(", plain_layer>>")
        functions, _ = cuda_side._functions(arch, cuda_side.extension_path())
        for launch in (rows, keys):
            counts = cuda_side.program_counts(launch, arch)
            issued = Counter()
            for ins in functions[launch.symbol].instructions:
                issued[ins.base] += counts.issued.get(ins.address, 0)
            per_arch[arch, launch.program] = issued
    tiles = _C.cuda_backward_tiles(H, D, 64, 64, "bfloat16")
    for program, kind, stores in (("backward_rows", "rows", 4 * 2), ("backward_keys", "keys", 4 * 2)):
        # Row pass: each warp stores its rows' dM once per 16-key chunk (4 at Nk = 64) in each of two
        # sweeps; key pass (one program: the block's keys): A^T and dM^T once per query chunk (4 at Nq = 64)
        # and 16-key tile of the warp.
        shape = tiles[kind]
        per_store = 1 if shape["groups"] * shape["heads"] > 8 else 2
        warps = shape["kslabs" if kind == "keys" else "slabs"] * shape["groups"]
        tiles_per_warp = shape.get("tiles", 1)  # the key pass's 16-key tiles per warp (backward_configs.h)
        assert per_arch[90, program]["STSM"] == warps * (16 // shape["groups"] // per_store) * stores * tiles_per_warp, \
            program
        assert per_arch[80, program]["STSM"] == 0 and per_arch[80, program]["STS"] > 0
        assert per_arch[90, program]["SHFL"] > 0 and per_arch[90, program]["HMMA"] > per_arch[90, program]["STSM"]
    fp16 = _launches(cuda_side.cuda_call(1, H, 64, D, "layer", 90, dtype=torch.float16))["bwd"]
    assert fp16[0].name.endswith(", plain_backward_rows>>") and fp16[1].name.endswith(", plain>>")


@pytest.mark.parametrize("norm", ["layer", "batch-train"])
def test_parameter_steps_are_modelled_from_their_sass(norm):
    # param_grads_kernel and training BatchNorm's steps run in the SASS emulator like the programs: one block
    # each, every branch on the launch's parameters (the storage types, the norm), none an indexed jump it
    # cannot follow.
    from benchmarks import cuda_side

    call = _launches(cuda_side.cuda_call(2, 3, 40, 16, norm, 90), parameter_steps=True)
    steps = [x for x in call["fwd"] + call["bwd"] if x.program in PARAMETER_STEPS]
    assert [x.program for x in steps] == (["param_grads"] if norm == "layer" else
                                          ["bn_moments", "running_stats", "bn_coefficients", "param_grads"])
    for launch in steps:
        model = cuda_side.model_launch(launch, 90)
        assert model.spill_bytes == 0 and model.programs == 1 and "no semantics" not in model.note
        assert model.work.instructions["global"] > 0
        unknown = cuda_side.program_counts(launch, 90).diag.unknown_branches
        if launch.program not in ("param_grads", "moments_center"):
            # float64 division and square root: their slow paths (denormal or special operands) branch on data
            assert len(unknown) <= 8, unknown
        else:
            assert not unknown, launch.program
