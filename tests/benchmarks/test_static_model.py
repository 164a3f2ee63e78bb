"""The static model (benchmarks/static_model.py) end to end, and the pieces that need compiled kernels.

Compiling needs Triton without its interpreter, so those checks run in a background process
(tests/benchmarks/_compiled_checks.py, started at collection by tests/conftest.py); the launch
capture runs here (it works in the interpreter too: nothing is launched).
"""
import math
import subprocess
import sys

import pytest
import torch

from benchmarks import static_model
from reattn.kernels import launch
from reattn.kernels.capture import capture_launches
from tests.benchmarks import _compiled_checks


def _check(name):
    results = _compiled_checks.results()
    assert name in results, results.get("_stderr")
    result = results[name]
    assert result["ok"], result.get("error")
    return result["value"]


# ---- capture (in process) ----
def test_capture_records_launches_for_the_target_and_launches_nothing():
    from reattn.kernels.forward import re_attention_forward

    q = torch.empty(2, 3, 40, 16, device="meta", dtype=torch.bfloat16)
    w = torch.empty(3, 3, device="meta")
    with capture_launches(86) as launches:
        assert launch.interpreting() is False
        assert launch.device_shared_limit("cuda:0") == 101376
        out, lse = re_attention_forward(q, q, q, w, None, scale=0.25)
        with pytest.raises(RuntimeError, match="already active"):
            with capture_launches(90):
                pass
    assert launch.CAPTURE is None
    stats, rec = launches
    # the softmax statistics first (bf16, no mask: launch.splits_softmax_stats), per (batch, head, 256 rows)
    assert stats.name == "_softmax_stats_kernel" and stats.grid == (2 * 3 * 1,)
    # 3 heads: 8 slots hold two row groups of 32 rows, so one program covers the 40 queries: B programs
    assert rec.name == "_re_attention_fwd_kernel" and rec.grid == (2 * 1, 1)
    const = rec.constexprs()
    assert (const["BLOCK_M"], const["BLOCK_N"], const["HP"], const["G"]) == (32, 32, 8, 2)  # the GPU's choice
    assert const["DOT_LOWP"] is True
    assert rec.options() == {"num_warps": 8, "num_stages": 1}
    assert rec.bound()["N_K"] == 40 and rec.bound()["Q"] is q


def test_capture_follows_each_norm_modes_sequence():
    from benchmarks import triton_side
    from reattn.backends.triton import TRITON_OPS

    names = {}
    for norm in static_model.NORMS:
        steps = triton_side.fused_call(TRITON_OPS, 2, 3, 20, 16, norm, 90)
        names[norm] = {phase: [e.name for e in events if hasattr(e, "kernel")] for phase, events in steps.items()}
    fwd, dq, dkdv = "_re_attention_fwd_kernel", "_re_attention_bwd_dq_kernel", "_re_attention_bwd_dkdv_kernel"
    stats = "_softmax_stats_kernel"  # the forward's first sweep in a launch of its own (no mask, bf16)
    for norm in ("none", "layer"):
        assert names[norm] == {"fwd": [stats, fwd], "bwd": [dq, dkdv]}, (norm, names[norm])
    # Eval-mode BatchNorm: the call without gradients (the model's fwd rows) is the inference op, whose forward
    # folds the norm itself (no torch op); the call with gradients folds it in autograd.
    assert names["batch-eval"] == {"infer": [stats, fwd], "fwd": [stats, fwd], "bwd": [dq, dkdv]}
    steps = triton_side.fused_call(TRITON_OPS, 2, 3, 20, 16, "batch-eval", 90)
    assert [e.name for e in steps["infer"]] == [stats, fwd] and steps["infer"][1].constexprs()["BN_EVAL"] is True
    # Training BatchNorm: the one-sweep forward (with moments), the statistics and coefficients in one launch
    # (FusedKernels.bn_moments), its per-head affine finish (FusedKernels.head_affine) and the running
    # statistics' update (FusedKernels.update_running_stats); the backward's BatchNorm sums from dO, the kept
    # X V and U in one pass (FusedKernels.head_dot_sums), not a sweep over the keys (the dq kernel with
    # SUMS_ONLY), finished with the coefficients in one launch (FusedKernels.bn_coefficients), then the backward.
    assert names["batch-train"] == {
        "fwd": [stats, fwd, "_bn_moments_kernel", "_affine_kernel", "_running_stats_kernel"],
        "bwd": ["_dot_sums_kernel", "_bn_coefficients_kernel", dq, dkdv]}
    steps = triton_side.fused_call(TRITON_OPS, 2, 3, 20, 16, "batch-train", 90)
    _, first, _, finish, _ = [e for e in steps["fwd"] if hasattr(e, "kernel")]
    # X V in the input dtype (bf16 here), read once by the finish and kept for the backward's sums
    assert first.constexprs()["MOMENTS"] is True and finish.bound()["R"].dtype == torch.bfloat16
    _, _, main, _ = [e for e in steps["bwd"] if hasattr(e, "kernel")]
    assert main.constexprs()["SUMS_ONLY"] is False
    # The torch operations around the kernels are counted too: here U = sum of V over the keys, where the
    # statistics' steps on [H] tensors (torch's rsqrt, lerp_) are gone into the launches.
    ops = [e.name for e in steps["fwd"] if not hasattr(e, "kernel")]
    assert "sum" in ops and "lerp_" not in ops and "rsqrt" not in ops, ops


# ---- compiled (background process) ----
def test_compiles_as_the_jit_specializes():
    value = _check("specialization")
    # As a real launch (DeiT-S, LayerNorm: 32 x 16 tiles, two stages): unit strides are constants,
    # multiples of 16 carry divisibility hints; the shared memory within the rules' bound.
    from reattn.kernels import launch as rules

    cfg = rules.forward_config(197, 197, 64, 6, interpret=False, variant="layer")
    assert 0 < value["shared"] <= rules.shared_bytes("forward", cfg, 2, masked=False) and value["num_warps"] == 8
    assert value["signature"]["stride_qd"] == "constexpr" and value["signature"]["stride_sm"] == "constexpr"
    spec = value["specialization"]
    assert spec["Q"] == "D" and spec["D"] == "D" and spec["stride_qm"] == "D"
    assert spec["N_Q"] == "" and spec["H"] == ""  # 197 and 6: no hint
    assert value["grid"] == [256 * 7, 1]  # ceil(197 / 32) query blocks per batch element


def test_source_loops_of_a_launch():
    value = _check("loops")
    # N = 100 in blocks of 64: 2 trips; the helper's loop (M = 3) inside it, inlined at line 21; the
    # static_range is unrolled (no loop).
    assert value["tree"] == [dict(line=17, trips=2, calls=[],
                                  children=[dict(line=8, trips=3, calls=[21])])]
    assert value["accesses"] == {"X": ["read"], "Y": ["write"]}
    assert "while loop" in value["while_refused"]


def test_source_loop_counts_agree_with_emulation():
    value = _check("crosscheck")
    assert set(value["kernels"]) == {"_fa_fwd_kernel", "_softmax_stats_kernel", "_re_attention_fwd_kernel"}
    for name, k in value["kernels"].items():
        # The static count executes every instruction of a loop body each iteration (and nothing after
        # EXIT); the emulation skips what branches skip: within 3% here.
        assert math.isclose(k["loops"], k["emulated"], rel_tol=0.03), (name, k)
        assert k["tensor"][0] == k["tensor"][1] and k["mufu"][0] == k["mufu"][1], (name, k)
    toy = value["toy"]
    assert all(t["note"].startswith("counted by emulation") for t in toy.values())
    # The inner loop's work grows linearly with M although ptxas unrolled and versioned it.
    base = toy["0"]["fp32"]
    assert toy["9"]["fp32"] - base == 3 * (toy["3"]["fp32"] - base) > 0
    assert "do not have the nesting" in value["mismatch"]


def test_the_model_runs_for_one_shape_and_records():
    value = _check("model")
    assert value["returncode"] == 0, value["stderr"]
    rows = value["rows"]
    for column in static_model.COLUMNS[:20]:
        assert column in rows[0], column
    totals = {(r["backend"], r["mode"], r["norm"]): r for r in rows if r["kernel"] == "total"}
    for backend in ("triton", "eager"):
        for norm in ("layer", "none"):
            for mode in ("fwd", "bwd", "fwd+bwd"):
                r = totals[(backend, mode, norm)]
                assert r["status"] == "predicted" and 0 < float(r["t_low_us"]) <= float(r["t_high_us"]), r
    for mode in ("fwd", "bwd", "fwd+bwd"):
        assert totals[("reference", mode, "none")]["status"] == "predicted"
    fb = totals[("triton", "fwd+bwd", "layer")]
    parts = [totals[("triton", m, "layer")] for m in ("fwd", "bwd")]
    assert math.isclose(float(fb["t_low_us"]), sum(float(p["t_low_us"]) for p in parts), rel_tol=1e-3)
    kernels = [r for r in rows if r["backend"] == "triton" and r["kernel"] == "_re_attention_fwd_kernel"]
    assert kernels and all(int(r["registers"]) > 0 and int(r["blocks_per_sm"]) >= 1 for r in kernels)
    assert all(r["arch"] == "sm_90" and r["gpu"] == "H100-SXM" and r["dtype"] == "bf16" for r in rows)
    readme = value["readme"]
    assert static_model.START in readme and static_model.END in readme
    assert "Predicted on H100/H200 (static model, not measured)" in readme and "## Building" in readme
    assert "Predicted" in value["stdout"]


def test_help_documents_the_command():
    out = subprocess.run([sys.executable, "-m", "benchmarks.static_model", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for word in ("--record", "--shapes", "--backends", "--kernels", "--constants", "predicted", "DeiT-S"):
        assert word.lower() in out.lower(), word


def test_useful_flops():
    B, H, N, D = 2, 3, 5, 4
    attn, mix = B * H * N * N * D, B * H * H * N * N
    assert static_model.useful_flops("reference", B, H, N, D, "fwd") == 4 * attn
    assert static_model.useful_flops("triton", B, H, N, D, "fwd") == 4 * attn + 2 * mix
    assert static_model.useful_flops("eager", B, H, N, D, "fwd+bwd") == 12 * attn + 6 * mix


def test_the_readme_section_takes_each_backends_latest_sm90_run():
    """A run of one backend or shape (--backends cuda, --shapes ViT-B) replaces those rows in the section
    and keeps the others'; sm_80 rows never enter the H100/H200 tables."""
    def row(date, backend, t, arch="sm_90"):
        return dict(date=date, commit=date[-2:], toolchain="tc", arch=arch, gpu="H100-SXM", backend=backend,
                    kernel="total", mode="fwd", norm="none", shape="DeiT-S", dtype="bf16", status="predicted",
                    t_low_us=str(t), t_high_us=str(2 * t))

    rows = [row("2026-12-01T01", "triton", 100), row("2026-12-01T01", "cuda", 90),
            row("2026-12-01T01", "reference", 50), row("2026-12-01T01", "eager", 400),
            row("2026-12-01T02", "cuda", 70), row("2026-12-01T03", "cuda", 10, arch="sm_80")]
    rows += [dict(r, shape="ViT-B") for r in rows[:4]] + [dict(row("2026-12-01T04", "triton", 300), shape="ViT-B")]
    text = "\n".join(static_model.readme_section(rows))
    line = next(l for l in text.splitlines() if l.startswith("| DeiT-S | fwd | none |"))
    assert line.split(" | ")[3:7] == ["100–200", "70–140", "50–100", "400–800"], line
    assert "commit `02`" in text and "commit `01`" in text and "commit `03`" not in text
    vit = next(l for l in text.splitlines() if l.startswith("| ViT-B | fwd | none |"))
    assert vit.split(" | ")[3:7] == ["300–600", "90–180", "50–100", "400–800"], vit  # per shape too
