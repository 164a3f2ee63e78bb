#!/usr/bin/env python
"""Train a small DeepViT on scikit-learn's bundled digits (8x8 images, no download), eager vs fused.

The same model (same initial weights, same batches, no dropout) is trained once per backend:
``eager`` (the reference in plain PyTorch, which materializes the [B, H, N, N] maps) and the
fastest fused backend that can train it on the device (on CPU the C++ ``cpu`` kernel when the
extension has it). The loss curves should match to rounding; the time per epoch shows what
fusing buys. At the end the eager model's attention collapse is measured with
``reattn.cross_layer_similarity`` (the DeepViT paper's metric).

    python examples/train_digits.py                      # about a minute per backend on 2 CPU cores
    python examples/train_digits.py --epochs 1 --limit 64 --data synthetic   # smoke run, no scikit-learn
    python examples/train_digits.py --backends eager,triton --limit 64 --epochs 1
        # Triton on CPU runs in its interpreter (TRITON_INTERPRET=1, set here): very slow, tiny runs only

The model: 8x8 images cut into 2x2 patches (16 tokens + a class token), ``depth`` pre-norm blocks
whose attention is ``reattn.ReAttention`` (BatchNorm over the mixed maps, as the official DeepViT).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=0, help="use only this many training images (0: all 1437)")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=2, choices=(1, 2, 4))
    p.add_argument("--norm", default="batch", choices=("batch", "layer", "none"),
                   help="the norm after head mixing: batch (official DeepViT), layer (vit-pytorch), none")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", default="auto",
                   help="comma-separated backends to train with; auto = eager and the best fused backend available")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--data", default="digits", choices=("digits", "synthetic"),
                   help="digits: scikit-learn's bundled 8x8 digits; synthetic: noisy class prototypes (no sklearn)")
    p.add_argument("--heatmap", default="", help="write the cross-layer similarity figure of the eager model here")
    p.add_argument("--similarity-images", type=int, default=128,
                   help="test images for the attention-collapse measurement (0: skip it)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()
    if "triton" in ARGS.backends.split(",") and ARGS.device == "cpu":
        # Triton runs CPU tensors only in its interpreter, which must be chosen before triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import reattn  # noqa: E402
from reattn.backends import Problem, unavailable_reason  # noqa: E402

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is in the dev environment
    tqdm = None


# ----------------------------------------------------------------------------- data

def load_data(kind: str, seed: int):
    """(x_train [N, 1, 8, 8], y_train, x_test, y_test), float32 standardized, a fixed 80/20 split."""
    g = torch.Generator().manual_seed(seed)
    if kind == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            sys.exit("this example needs scikit-learn for its bundled digits (pip install scikit-learn), "
                     "or run it with --data synthetic")
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
    else:  # ten noisy prototypes: learnable, no dependency
        protos = (torch.rand(10, 1, 8, 8, generator=g) > 0.6).float()
        y = torch.randint(0, 10, (1797,), generator=g)
        x = (protos[y] + 0.35 * torch.randn(len(y), 1, 8, 8, generator=g)).clamp(0, 1)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(y))
    mean, std = x[:n_train].mean(), x[:n_train].std()
    x = (x - mean) / std
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


# ----------------------------------------------------------------------------- model

class Block(nn.Module):
    def __init__(self, dim, heads, norm):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = reattn.ReAttention(dim, heads, qkv_bias=True, norm=norm)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyDeepViT(nn.Module):
    """A DeepViT for 8x8 single-channel images: patch embedding, class token, ReAttention blocks."""

    def __init__(self, depth=6, dim=64, heads=4, patch=2, norm="batch", num_classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        tokens = (8 // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, norm) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])

    def set_backend(self, backend: str) -> "TinyDeepViT":
        for module in self.modules():
            if isinstance(module, reattn.ReAttention):
                module.backend = backend
        return self


# ----------------------------------------------------------------------------- backends

def problems(args, device):
    head_dim = args.dim // args.heads
    train = Problem(device, heads=args.heads, head_dim=head_dim, norm=args.norm,
                    batchnorm_training=args.norm == "batch", needs_grad=True)
    evaluate = Problem(device, heads=args.heads, head_dim=head_dim, norm=args.norm)
    return train, evaluate


def why_not(backend, args, device):
    """None when ``backend`` can train and evaluate this model on ``device``, else the reason."""
    for problem in problems(args, device):
        reason = unavailable_reason(backend, problem)
        if reason is not None:
            return reason
    return None


def choose_backends(args, device):
    if args.backends != "auto":
        names = [b.strip() for b in args.backends.split(",") if b.strip()]
        for name in names:
            reason = why_not(name, args, device)
            if reason is not None:
                sys.exit(f"backend {name!r} cannot train this model on {device}: {reason}")
        return names, []
    # Fused backends in order of preference; the Triton interpreter (CPU) is far too slow for "auto".
    preference = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    refused = []
    for name in preference:
        reason = why_not(name, args, device)
        if reason is None:
            return ["eager", name], refused
        refused.append((name, reason))
    return ["eager"], refused


# ----------------------------------------------------------------------------- training

def evaluate(model, x, y, batch_size):
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            logits = model(x[i:i + batch_size])
            loss += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum").item()
            correct += (logits.argmax(-1) == y[i:i + batch_size]).sum().item()
    return loss / len(y), correct / len(y)


def train(model, backend, data, args):
    x_train, y_train, x_test, y_test = data
    model.set_backend(backend)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.15)
    order = torch.Generator().manual_seed(args.seed + 1)  # the same batches for every backend
    bar = None
    if tqdm is not None and not args.no_progress:
        bar = tqdm(total=total, desc=f"{backend:>6}", unit="batch", dynamic_ncols=True, leave=True)
    history = dict(step_losses=[], train_loss=[], test_loss=[], test_acc=[], epoch_time=[])
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=order)
        start, running = time.perf_counter(), 0.0
        for i in range(0, len(y_train), args.batch_size):
            idx = perm[i:i + args.batch_size].to(x_train.device)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = loss.item()
            running += value * len(idx)
            history["step_losses"].append(value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}")
        history["epoch_time"].append(time.perf_counter() - start)
        history["train_loss"].append(running / len(y_train))
        test_loss, test_acc = evaluate(model, x_test, y_test, 256)
        history["test_loss"].append(test_loss)
        history["test_acc"].append(test_acc)
    if bar is not None:
        bar.close()
    return history


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x_train, y_train, x_test, y_test = load_data(args.data, args.seed)
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    data = tuple(t.to(device) for t in (x_train, y_train, x_test, y_test))
    backends, refused = choose_backends(args, device)

    print(f"data: {args.data}, {len(y_train)} training and {len(y_test)} test images of 8x8; model: "
          f"{args.depth} ReAttention blocks, dim {args.dim}, {args.heads} heads, {(8 // args.patch) ** 2 + 1} "
          f"tokens, norm={args.norm!r}; {args.epochs} epochs of batch {args.batch_size}; device {device}, "
          f"{torch.get_num_threads()} threads")
    if refused:
        print("No fused backend can train this model here, so only the eager backend runs:")
        for name, reason in refused:
            print(f"  {name}: {reason}")
    print(f"backends: {', '.join(backends)}")

    torch.manual_seed(args.seed)
    initial = TinyDeepViT(args.depth, args.dim, args.heads, args.patch, args.norm).to(device)
    results, models = {}, {}
    for backend in backends:
        model = copy.deepcopy(initial)  # identical initial weights for every backend
        try:
            results[backend] = train(model, backend, data, args)
        except Exception as error:  # say which backend failed, then fail
            print(f"\nbackend {backend!r} failed: {type(error).__name__}: {error}", file=sys.stderr)
            raise
        models[backend] = model

    # ---- report: loss curves side by side, time per epoch
    names = list(results)
    header = f"{'epoch':>5} | " + " | ".join(f"{n + ' loss':>12} {n + ' acc':>9} {n + ' s':>8}" for n in names)
    if len(names) > 1:
        header += f" | {'|loss diff|':>11}"
    print("\n" + header)
    print("-" * len(header))
    for e in range(args.epochs):
        row = f"{e + 1:>5} | " + " | ".join(
            f"{results[n]['train_loss'][e]:>12.5f} {100 * results[n]['test_acc'][e]:>8.1f}% "
            f"{results[n]['epoch_time'][e]:>8.2f}" for n in names)
        if len(names) > 1:
            row += f" | {abs(results[names[0]]['train_loss'][e] - results[names[1]]['train_loss'][e]):>11.2e}"
        print(row)
    print()
    for n in names:
        times = results[n]["epoch_time"]
        steady = times[1:] if len(times) > 1 else times  # the first epoch includes warm-up
        print(f"{n:>6}: {sum(steady) / len(steady):.3f} s per epoch (mean over epochs {2 if len(times) > 1 else 1}"
              f"..{len(times)}), final train loss {results[n]['train_loss'][-1]:.5f}, test accuracy "
              f"{100 * results[n]['test_acc'][-1]:.1f}%")
    if len(names) > 1:
        a, b = (results[n]["step_losses"] for n in names[:2])
        steps_per_epoch = len(a) // args.epochs
        first = max(abs(u - v) for u, v in zip(a[:steps_per_epoch], b[:steps_per_epoch]))
        diff = max(abs(u - v) for u, v in zip(a, b))
        ta = sum(results[names[0]]["epoch_time"][1:] or results[names[0]]["epoch_time"])
        tb = sum(results[names[1]]["epoch_time"][1:] or results[names[1]]["epoch_time"])
        print(f"loss curves: largest per-step |{names[0]} - {names[1]}| = {first:.2e} over the first epoch, "
              f"{diff:.2e} over all {len(a)} steps (float32 rounding differences between two correct "
              f"implementations grow as training goes on: the curves agree to rounding at first, then closely)")
        print(f"speed: {names[1]} is {ta / tb:.3g}x the speed of {names[0]} per epoch (wall clock; noisy on a "
              f"shared machine)")

    # ---- attention collapse of the trained eager model (the DeepViT paper's metric)
    if args.similarity_images > 0:
        model = models[names[0]].set_backend("eager")
        sim = reattn.cross_layer_similarity(model, data[2][:args.similarity_images],
                                            name=f"TinyDeepViT, {args.depth} blocks, trained ({names[0]})")
        print("attention collapse: " + sim.summary())
        print("  adjacent-block similarity: " + " ".join(f"{v:.3f}" for v in sim.adjacent.tolist()))
        if args.heatmap:
            print(f"  figure: {sim.save_heatmap(args.heatmap)}")
    return results


if __name__ == "__main__":
    main(ARGS)
