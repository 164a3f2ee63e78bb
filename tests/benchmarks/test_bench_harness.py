"""The benchmark harness in a tiny configuration: every provider runs, numbers are finite, files are written.

Speeds are not checked (they depend on the machine); that the harness measures what it says is.
"""
import math
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import reattn  # noqa: E402
from benchmarks import bench_models, bench_reattn, common, report  # noqa: E402
from benchmarks.providers import BASELINE, COMPILED, SDPA, VIT_PYTORCH, Provider  # noqa: E402

CPU = torch.device("cpu")
NUMERIC = ("median_ms", "p20_ms", "p80_ms", "tflops_model", "gbps_io", "speedup_vs_eager", "peak_mem_mb")


def _benchmarked_fused_backends():
    """Fused backends the harness must run here (never the Triton interpreter or the CUDA emulator)."""
    from benchmarks.providers import correctness_tool_reason

    return [name for name in reattn.available_backends(CPU)
            if name != "eager" and correctness_tool_reason(name, CPU) is None]


def _check_rows(rows, expected_providers):
    assert rows, "no rows"
    for row in rows:
        assert row["status"] in ("ok", "skipped"), f"{row['provider']} failed: {row['note']}"
        if row["status"] == "skipped":
            assert row["note"], f"{row['provider']} skipped without a reason"
            continue
        for key in NUMERIC:
            assert math.isfinite(float(row[key])), (row["provider"], key, row[key])
        assert float(row["median_ms"]) > 0
        assert float(row["p20_ms"]) <= float(row["median_ms"]) <= float(row["p80_ms"])
        if row["max_abs_diff_vs_eager"] != "":
            assert float(row["max_abs_diff_vs_eager"]) < 1e-3, (row["provider"], row["max_abs_diff_vs_eager"])
    ran = {row["provider"] for row in rows if row["status"] == "ok"}
    missing = set(expected_providers) - ran
    assert not missing, f"providers that never ran: {sorted(missing)}"


def test_microbenchmark_tiny_run_writes_csv_and_plots(tmp_path):
    # Every mode with the official training norm, and a 2-point N sweep (for the plots).
    bench_reattn.main([
        "--device", "cpu", "--shapes", "DeiT-S", "--batch", "1", "--modes", "fwd", "bwd", "fwd+bwd",
        "--norms", "batch-train", "--dtypes", "float32",
        "--sweep-tokens", "16", "32", "--sweep-modes", "fwd", "fwd+bwd", "--sweep-norms", "batch-eval",
        "--sweep-tokens-per-batch", "32", "--warmup", "0", "--reps", "2", "--compile", "none", "--no-models",
        "--results", str(tmp_path), "--machine", "test",
    ])
    rows = common.read_csv(tmp_path / "microbench.csv")
    _check_rows(rows, [BASELINE, SDPA] + _benchmarked_fused_backends())
    configs = {(row["shape"], row["tokens"], row["mode"], row["norm"]) for row in rows}
    assert len(configs) == 3 + 4
    for column in ("date", "commit", "device", "torch", "run_id", "machine"):
        assert rows[0][column], column
    for name in ("cpu-float32-speedup.png", "cpu-float32-time-vs-n.png", "cpu-float32-memory-vs-n.png"):
        path = tmp_path / name
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # The other norms (vit-pytorch runs with "layer"), appended to the same CSV.
    bench_reattn.main(["--device", "cpu", "--shapes", "DeiT-S", "--batch", "1", "--modes", "fwd",
                       "--norms", "batch-eval", "layer", "--dtypes", "float32", "--sweep-tokens", "--warmup", "0",
                       "--reps", "1", "--compile", "none", "--no-models", "--no-plots", "--results", str(tmp_path)])
    all_rows = common.read_csv(tmp_path / "microbench.csv")
    added = all_rows[len(rows):]
    assert {row["norm"] for row in added} == {"batch-eval", "layer"}
    _check_rows(added, [BASELINE, SDPA, VIT_PYTORCH] + _benchmarked_fused_backends())


def test_torch_compile_provider_reports_compile_time_apart(tmp_path, monkeypatch):
    # What is checked is the harness's bookkeeping of a compiled provider (compile time apart, timing, the
    # difference to eager), not inductor: its cold compile of even this forward took 43 s of the 2-core suite;
    # inductor itself compiles the op in tests/test_autograd_and_compilers.py.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend="aot_eager", **kwargs))
    suite = bench_reattn.Suite(name="test", shapes=(), modes=(), norms=(), dtypes=("float32",), batch=1,
                               sweep_tokens=(), sweep_modes=(), sweep_norms=(), sweep_tokens_per_batch=1,
                               warmup=0, reps=2, compile_scope="all")
    # The forward alone: an inductor compile of the backward too took ~80 s of this suite on 2 cores, and what
    # is checked here is the harness's bookkeeping (compiled graphs with a backward: test_autograd_and_compilers).
    config = bench_reattn.Config("tiny", heads=2, tokens=8, head_dim=4, batch=2, mode="fwd", norm="batch-eval",
                                 dtype="float32")
    rows = bench_reattn.run_config(config, suite, CPU, common.run_metadata(CPU), excluded=_benchmarked_fused_backends())
    compiled = [row for row in rows if row["provider"] == COMPILED]
    assert len(compiled) == 1
    row = compiled[0]
    assert row["status"] == "ok", row["note"]
    assert float(row["compile_s"]) > 0 and math.isfinite(float(row["median_ms"]))
    assert float(row["max_abs_diff_vs_eager"]) < 1e-4


def _tiny_reattention_vit() -> torch.nn.Module:
    """A 2-block ViT on 32 px images with every attention swapped for ReAttention (the benchmark's recipe)."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2,
                              qkv_bias=True, num_classes=1000)
    return bench_models._replace_attention(model)


def test_benchmarked_models_build_with_reattention_everywhere():
    for name, expected in (("DeepViT-16b", 16), ("DeiT-S-reattn", 12)):
        model = bench_models.MODELS[name].build()
        assert bench_models.set_backend(model, "eager") == expected, name
        assert all(block.attn.apply_transform for block in model.blocks), name


def test_refusing_and_failing_providers_are_recorded_with_their_reason(monkeypatch):
    original = bench_reattn.build_providers

    def refuse(q, k, v):
        raise ValueError("this mode is not supported yet")

    def crash(q, k, v):
        raise RuntimeError("boom")

    def with_two_more(*args, **kwargs):
        return original(*args, **kwargs) + [Provider("refuser", refuse), Provider("crasher", crash)]

    monkeypatch.setattr(bench_reattn, "build_providers", with_two_more)
    suite = bench_reattn.Suite(name="test", shapes=(), modes=(), norms=(), dtypes=("float32",), batch=1,
                               sweep_tokens=(), sweep_modes=(), sweep_norms=(), sweep_tokens_per_batch=1,
                               warmup=0, reps=1, compile_scope="none")
    config = bench_reattn.Config("tiny", heads=2, tokens=8, head_dim=4, batch=1, mode="fwd", norm="batch-eval",
                                 dtype="float32")
    rows = {row["provider"]: row for row in bench_reattn.run_config(config, suite, CPU, common.run_metadata(CPU))}
    assert rows["refuser"]["status"] == "skipped" and rows["refuser"]["note"] == "this mode is not supported yet"
    assert rows["crasher"]["status"] == "failed" and rows["crasher"]["note"] == "RuntimeError: boom"
    assert rows[BASELINE]["status"] == "ok" and rows[SDPA]["status"] == "ok"
    assert set(rows["refuser"]) == set(rows[BASELINE])  # one set of columns for every row


def test_whole_model_tiny_run_and_readme_section(tmp_path, monkeypatch):
    monkeypatch.setitem(bench_models.MODELS, "tiny", bench_models.ModelSpec(_tiny_reattention_vit, image_size=32))
    rows = bench_models.main_from_suite(CPU, quick=True, results=tmp_path, models=["tiny"],
                                        modes=("inference", "train-step"), batch=2, warmup=0, steps=2)
    ran = {row["backend"] for row in rows if row["status"] == "ok"}
    assert {"eager", *_benchmarked_fused_backends()} <= ran, rows
    for row in rows:
        assert row["status"] in ("ok", "skipped") and (row["status"] == "ok" or row["note"]), row
        if row["status"] == "ok":
            assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0
            assert row["reattention_modules"] == 2
    assert (tmp_path / "models.csv").exists()

    # The README section is generated from the CSVs, and regenerating it replaces it.
    bench_reattn.main(["--device", "cpu", "--shapes", "DeiT-S", "--batch", "1", "--modes", "fwd", "--norms",
                       "batch-eval", "--dtypes", "float32", "--sweep-tokens", "16", "32", "--sweep-modes", "fwd",
                       "--warmup", "0", "--reps", "1", "--compile", "none", "--no-models", "--results", str(tmp_path)])
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Usage\n\ntext\n\n## Building\n\nmore\n")
    report.main(["--results", str(tmp_path), "--readme", str(readme)])
    first = readme.read_text()
    assert first.index("## Results") < first.index("## Building")
    assert "No GPU run is recorded yet" in first or "### GPU" in first
    assert common.device_name(CPU) in first and "| tiny |" in first and "cpu-float32-speedup.png" in first
    report.main(["--results", str(tmp_path), "--readme", str(readme)])
    assert readme.read_text() == first


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
def test_cost_model_matches_the_math_note(mode):
    # B=1, H=12, N=197, D=32: units per head are 3 + H/D forward, 7 + 2H/D backward (+1 for BN train).
    matmul = 2 * 197 * 197 * 32
    units = {"fwd": 3 + 12 / 32, "bwd": 7 + 24 / 32, "fwd+bwd": 10 + 36 / 32}[mode]
    assert common.flops_model(1, 12, 197, 197, 32, mode, "layer") == pytest.approx(12 * units * matmul)
    per_operand = 197 * 32 * 2 * 12
    assert common.bytes_model(1, 12, 197, 197, 32, mode, 2) == {"fwd": 4, "bwd": 7, "fwd+bwd": 11}[mode] * per_operand


def test_cpu_peak_memory_counts_what_the_call_allocates():
    size = 1 << 20  # float32 elements: 4 MiB

    def two_buffers():
        first = torch.ones(size)
        second = first * 2  # both alive: 8 MiB
        return second

    peak = common.peak_memory_bytes(two_buffers, CPU)
    assert 8 * 2**20 <= peak < 9 * 2**20


def test_gpu_suites_run_deepvit_16b_at_the_issue_batch_and_batch_overrides_it():
    gpu = torch.device("cuda")  # only the suite's description: nothing runs on it
    for quick in (True, False):
        configs = bench_reattn.default_suite(gpu, quick).configs()
        batches = {(c.shape, c.tokens): c.batch for c in configs if c.shape != bench_reattn.SWEEP_SHAPE}
        assert batches[("DeiT-S", 197)] == 256 and batches[("DeepViT-16b", 197)] == 128, batches
    args = bench_reattn.parse_args(["--device", "cuda", "--quick", "--batch", "64"])
    suite = bench_reattn.suite_from_args(args, gpu)
    assert {c.batch for c in suite.configs() if c.shape != bench_reattn.SWEEP_SHAPE} == {64}
