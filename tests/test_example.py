"""Smoke runs of examples/train_digits.py with tiny settings (no scikit-learn needed for the first)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_digits.py"


def run_example(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # the example sets it itself when it needs it
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def test_train_digits_smoke_synthetic(tmp_path):
    png = tmp_path / "collapse.png"
    proc = run_example("--data", "synthetic", "--epochs", "1", "--limit", "64", "--depth", "2", "--batch-size", "32",
                       "--similarity-images", "16", "--heatmap", str(png))
    out = proc.stdout
    assert "backends: eager" in out
    assert "s per epoch" in out
    assert "attention collapse:" in out and png.exists()
    if "No fused backend" in out:  # it must say why, per fused backend
        assert "  cpu: " in out
    else:  # eager and a fused backend trained the same model: the curves match
        assert "largest per-step" in out
        diff = float(out.split("largest per-step")[1].split("=")[1].split()[0])
        assert diff < 1e-3, out
    try:
        import tqdm  # noqa: F401
    except ImportError:  # the example runs without its progress bar then
        return
    assert "batch/s" in proc.stderr or "s/batch" in proc.stderr  # the tqdm progress bar


def test_train_digits_smoke_digits():
    pytest.importorskip("sklearn")
    proc = run_example("--epochs", "1", "--limit", "64", "--depth", "2", "--backends", "eager",
                       "--similarity-images", "0", "--no-progress")
    assert "data: digits, 64 training and 360 test images" in proc.stdout
    assert "eager:" in proc.stdout and "s per epoch" in proc.stdout


def test_unknown_backend_is_refused_with_a_reason():
    # Without the CUDA emulator (conftest turns it on for the test process), cuda cannot run on CPU.
    env = dict(os.environ, PYTHONPATH=str(ROOT), REATTN_CUDA_EMULATE="0")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data", "synthetic", "--backends", "eager,cuda",
                           "--epochs", "1", "--limit", "8"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "backend 'cuda' cannot train this model on cpu" in proc.stderr


def test_says_clearly_when_no_fused_backend_can_train(monkeypatch, capsys):
    """In-process, with every fused backend refusing: the example names each reason and trains eager only."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_digits_example", SCRIPT)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(example, "unavailable_reason",
                        lambda backend, problem: None if backend == "eager" else f"{backend} refused for the test")
    args = example.parse_args(["--data", "synthetic", "--epochs", "1", "--limit", "32", "--depth", "1",
                               "--similarity-images", "0", "--no-progress"])
    results = example.main(args)
    out = capsys.readouterr().out
    assert list(results) == ["eager"]
    assert "No fused backend can train this model here, so only the eager backend runs:" in out
    assert "  cpu: cpu refused for the test" in out
