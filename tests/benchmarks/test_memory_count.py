"""benchmarks.memory_count: the CUDA backend's forward+backward peak, counted on the CPU through the emulator."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (a CPU-only torch): the CUDA backend needs its dropout")

from benchmarks import memory_count


@pytest.fixture(autouse=True)
def emulate(monkeypatch):
    monkeypatch.setenv("REATTN_CUDA_EMULATE", "1")


def test_the_flash_attention_reference_counts_its_tensors():
    # DeiT-S, B = 1: out, dq, dk, dv (bf16); logsumexp [6, 197] and softmax_d [6, 256] fp32; dq_accum [256, 6, 64] fp32
    B, H, N, D = 1, 6, 197, 64
    assert memory_count.flash_attention_bytes(B, H, N, D, 2) == 4 * H * N * D * 2 + H * N * 4 + H * 256 * 4 \
        + 256 * H * 64 * 4


def test_the_count_holds_the_outputs_and_training_batchnorms_saved_terms():
    B, H, N, D = 1, 2, 16, 8
    unit = B * H * N * D * 2  # one bf16 [B, H, N, D]
    none = memory_count.cuda_backend_bytes(B, H, N, D, "none")
    train = memory_count.cuda_backend_bytes(B, H, N, D, "batch-train")
    assert none >= 4 * unit  # out and the three input gradients are kept until the peak is read
    assert train >= none + unit  # R = xhat V [B, H, N, D] is saved for the backward's BatchNorm sums


def test_the_command_prints_a_row_per_shape_and_norm(capsys):
    rows = memory_count.main(["--shapes", "DeiT-S", "--norms", "none"])
    assert [(r["shape"], r["norm"]) for r in rows] == [("DeiT-S", "none")]
    assert "| DeiT-S | none |" in capsys.readouterr().out
    assert float(rows[0]["ratio"]) == pytest.approx(rows[0]["peak_bytes"] / rows[0]["flash_attention_2_bytes"],
                                                    abs=1e-3)


def test_it_refuses_to_count_without_the_emulator(monkeypatch):
    monkeypatch.delenv("REATTN_CUDA_EMULATE")
    with pytest.raises(RuntimeError, match="REATTN_CUDA_EMULATE=1"):
        memory_count.cuda_backend_bytes(1, 2, 4, 8, "none")
