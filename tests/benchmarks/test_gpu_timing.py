"""The GPU session's timing step (benchmarks/gpu_timing.py) and script, run here on what a CPU allows.

A GPU times the fused kernels; here the pipeline runs on the CPU with eager calls: cases in order,
CUDA-event timing replaced by the clock, kernel names mapped to the static model's, predictions
joined by (backend, kernel, mode, norm, shape), a row per measurement with ``measured_us``.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_timing

REPO = Path(__file__).resolve().parents[2]


def test_cases_run_in_priority_order():
    cases = gpu_timing.cases(["ViT-B", "DeiT-S"], ["layer", "none"], ["triton", "reference"])
    assert cases == [("DeiT-S", "triton", "layer"), ("DeiT-S", "triton", "none"), ("DeiT-S", "reference", "none"),
                     ("ViT-B", "triton", "layer"), ("ViT-B", "triton", "none"), ("ViT-B", "reference", "none")]


def test_profiled_kernel_names_map_to_the_models():
    assert gpu_timing.kernel_name("_re_attention_fwd_kernel") == "_re_attention_fwd_kernel"
    raw = "void reattn::cuda::re_attention_kernel<__nv_bfloat16, 2>(reattn::cuda::ReAttnParams)"
    assert gpu_timing.kernel_name(raw) == "re_attention_kernel<bfloat16, backward>"
    mangled = "_ZN6reattn4cuda19re_attention_kernelI13__nv_bfloat16Li0EEEvNS0_12ReAttnParamsE"
    assert gpu_timing.kernel_name(mangled) == "re_attention_kernel<bfloat16, forward>"
    row = "void reattn::cuda::forward_kernel<reattn::cuda::RowConfig<reattn::dev::Bf16, 4, 2, 3, 64, 64, 224, 1> >" \
        "(reattn::cuda::ReAttnParams)"
    assert gpu_timing.kernel_name(row) == "forward_kernel<RowConfig<bfloat16, 4, 2, 3, 64, 64, 224, plain_layer>>"
    narrow = "void reattn::cuda::forward_kernel<reattn::cuda::NarrowTail<reattn::cuda::RowConfig<reattn::dev::Bf16, " \
        "2, 4, 3, 48, 48, 64, 0> > >(reattn::cuda::ReAttnParams)"
    assert gpu_timing.kernel_name(narrow) == "forward_kernel<NarrowTail<RowConfig<bfloat16, 2, 4, 3, 48, 48, 64, plain_affine>>>"
    key = "void reattn::cuda::key_kernel<reattn::cuda::KeyConfig<reattn::dev::F16, 1, 8, 2, 32, 1, 1> >" \
        "(reattn::cuda::ReAttnParams)"
    assert gpu_timing.kernel_name(key) == "key_kernel<KeyConfig<float16, 1, 8, 2, 32, 1, plain>>"
    rows = "void reattn::cuda::forward_kernel<reattn::cuda::RowConfig<reattn::dev::Bf16, 2, 4, 2, 64, 64, 224, 5> >" \
        "(reattn::cuda::ReAttnParams)"
    assert gpu_timing.kernel_name(rows) == "forward_kernel<RowConfig<bfloat16, 2, 4, 2, 64, 64, 224, plain_backward_rows>>"
    # LayerNorm's own bf16 backward passes (row_configs.h kPlainLayerBackwardRows, backward_configs.h kKeysPlainLayer)
    layer_rows = rows.replace("224, 5>", "224, 6>")
    assert gpu_timing.kernel_name(layer_rows) == \
        "forward_kernel<RowConfig<bfloat16, 2, 4, 2, 64, 64, 224, plain_layer_backward_rows>>"
    layer_keys = key.replace("F16, 1, 8, 2, 32, 1, 1>", "Bf16, 1, 8, 2, 32, 1, 2>")
    assert gpu_timing.kernel_name(layer_keys) == "key_kernel<KeyConfig<bfloat16, 1, 8, 2, 32, 1, plain_layer>>"
    affine = "void reattn::cuda::head_affine_kernel<__nv_bfloat16>(reattn::cuda::HeadAffineParams)"
    assert gpu_timing.kernel_name(affine) == "head_affine_kernel<bfloat16>"
    sums = "_ZN6reattn4cuda20head_dot_sums_kernelIfEEvNS0_16HeadAffineParamsE"
    assert gpu_timing.kernel_name(sums) == "head_dot_sums_kernel<float32>"
    agg = gpu_timing.aggregate_kernels([("_fa_fwd_kernel", 10.0), ("_fa_fwd_kernel", 5.0), ("memset", 0.0)])
    assert agg == {"_fa_fwd_kernel": 15.0}
    assert gpu_timing.model_gpu_name("NVIDIA H200") == "H200" and gpu_timing.model_gpu_name("NVIDIA H100 80GB HBM3") \
        == "H100-SXM"


def test_pipeline_writes_measured_rows_joined_with_predictions(tmp_path):
    model = tmp_path / "static_model.csv"
    with model.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["date", "gpu", "arch", "backend", "kernel", "mode", "norm", "shape",
                                          "t_low_us", "t_high_us"])
        w.writeheader()
        w.writerow(dict(date="2026-12-01", gpu=gpu_timing.model_gpu_name(
            gpu_timing.common.device_name(torch.device("cpu"))), arch="cpu", backend="eager", kernel="total",
            mode="fwd", norm="layer", shape="DeepViT-16b", t_low_us="533", t_high_us="571"))
    out = tmp_path / "measured.csv"
    rows = gpu_timing.run(out, budget=120, shapes=["DeepViT-16b"], norms=["layer"], backends=["eager", "nope"],
                          device=torch.device("cpu"), warmup=0, reps=1, model_csv=model, batch=1, log=lambda s: None)
    written = list(csv.DictReader(out.open()))
    assert [tuple(r[c] for c in ("backend", "kernel", "mode")) for r in written] == [
        ("eager", "total", "fwd"), ("eager", "total", "fwd+bwd"), ("eager", "total", "bwd"),
        ("nope", "total", "fwd"), ("nope", "total", "fwd+bwd")]
    fwd = written[0]
    assert float(fwd["measured_us"]) > 0 and fwd["t_low_us"] == "533" and fwd["t_high_us"] == "571"
    assert written[3]["measured_us"] == "" and "backend must be one of" in written[3]["note"]
    assert set(gpu_timing.COLUMNS) <= set(written[0]) and len(rows) == 5


def test_without_a_gpu_the_step_and_the_session_say_so_and_fail(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_timing"], capture_output=True, text=True, cwd=REPO)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal cannot be shown here")
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "time"], capture_output=True, text=True, cwd=REPO,
                          env=env)
    assert proc.returncode == 2 and "sees no CUDA GPU" in proc.stderr
