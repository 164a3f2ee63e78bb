"""benchmarks.eager_model: the bytes and FLOPs of each kernel eager PyTorch launches, counted on meta tensors."""
import torch

from benchmarks.eager_model import OpCounter, eager_call


def test_counts_kernels_bytes_and_flops_and_skips_views():
    a = torch.empty(4, 8, 16, device="meta", dtype=torch.bfloat16)
    b = torch.empty(4, 16, 32, device="meta", dtype=torch.bfloat16)
    with OpCounter() as counter:
        c = a @ b                                  # bmm
        d = c.transpose(1, 2).reshape(4, -1)       # views, then a copy (the transpose is not contiguous)
        e = d.softmax(-1)
        torch.empty(10, device="meta")             # no kernel
        torch.zeros(0, device="meta")              # nothing to compute: no kernel
    names = [op.name for op in counter.ops]
    assert names == ["bmm", "clone", "_softmax"], names
    bmm = counter.ops[0]
    assert bmm.tensor and bmm.flops == 2 * 4 * 8 * 16 * 32
    assert bmm.bytes_read == (a.numel() + b.numel()) * 2 and bmm.bytes_written == c.numel() * 2
    soft = counter.ops[2]
    assert not soft.tensor and soft.bytes_read == d.numel() * 2 and soft.bytes_written == e.numel() * 2


def test_in_place_ops_read_and_write_their_tensor():
    x = torch.empty(1000, device="meta")
    with OpCounter() as counter:
        x.mul_(2.0)
    (op,) = counter.ops
    assert op.name == "mul_" and op.bytes_read == 4000 and op.bytes_written == 4000


def test_out_tensors_and_overwritten_tensors_are_written_not_read():
    # cat(..., out=) reads its inputs and writes out (ops.cpp pads rows so); copy_ and zero_ overwrite self.
    x = torch.empty(4, 5, device="meta", dtype=torch.bfloat16)
    z = torch.empty(1, 3, device="meta", dtype=torch.bfloat16)
    padded = torch.empty(4, 8, device="meta", dtype=torch.bfloat16)
    with OpCounter() as counter:
        torch.cat([x, z.expand(4, 3)], dim=1, out=padded)
        padded[:, :5].copy_(x)
        padded.zero_()
    cat, copy, zero = counter.ops
    assert cat.name == "cat" and cat.bytes_read == (20 + 3) * 2 and cat.bytes_written == 32 * 2
    assert copy.name == "copy_" and copy.bytes_read == 20 * 2 and copy.bytes_written == 4 * 8 * 2 - 6
    assert zero.name == "zero_" and zero.bytes_read == 0 and zero.bytes_written == 32 * 2


def test_eager_call_passes_over_the_map():
    B, H, N, D = 2, 3, 17, 8
    entries = B * H * N * N * 2  # bytes of one bf16 [B, H, N, N] map
    steps = eager_call(B, H, N, D, "layer")
    fwd = steps["fwd"]
    # QK^T, the scale, the softmax, the mixing, LayerNorm across heads, out_scale, AV: each a kernel.
    assert [op.name for op in fwd if op.tensor] == ["bmm", "convolution", "bmm"]
    conv = next(op for op in fwd if op.name == "convolution")
    assert conv.flops == 2 * B * H * N * N * H
    big = [op for op in fwd if op.bytes_written >= entries]
    assert len(big) >= 6  # at least six passes write a whole map
    assert steps["bwd"] and any(op.name == "convolution_backward" for op in steps["bwd"])
    for norm in ("none", "batch-eval", "batch-train"):
        assert eager_call(B, H, N, D, norm)["fwd"]
