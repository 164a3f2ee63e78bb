"""Whole-model benchmark: images/s of DeepViT-16b and DeiT-S with re-attention, eager vs fused.

Models (random weights, 224 px, 1000 classes):
  DeepViT-16b     ``reattn.models.deepvit_16b()`` (the official model: 16 blocks, dim 384, 12 heads,
                  mlp ratio 3, re-attention in every block); where ``reattn.models`` is missing, timm's
                  ``VisionTransformer`` of the same shape with every ``block.attn`` replaced by
                  ``reattn.ReAttention`` (qkv/proj weights copied)
  DeiT-S-reattn   timm ``deit_small_patch16_224`` with every ``block.attn`` swapped for a
                  ``ReAttention`` (``reattn.swap_attention``, or the same replacement by hand)

Each model is built once; its ``ReAttention`` modules are switched between ``backend="eager"``
and every fused backend available on the device (the same weights for all), the backends taking
turns step by step. Measured per model x backend: inference (eval mode, no autograd) and a
training step (train mode: forward,
cross-entropy on random labels, backward, AdamW step). On GPU both run under bf16 autocast; on
CPU in float32. Figures: median step time with p20/p80 and images/s = batch / median. A backend
that refuses a mode (ValueError, e.g. a mode its kernels do not cover) is recorded as skipped.

``python -m benchmarks.bench_reattn`` runs this after the microbenchmark (``--no-models`` skips
it); the quick suite on CPU measures DeepViT-16b alone at batch 2 to stay within its 2 minutes.
Alone: ``python -m benchmarks.bench_models [--quick] [--models ...] [--batch B]``.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

import reattn
from benchmarks import common

MODEL_MODES = ("inference", "train-step")


# ----------------------------------------------------------------------------- models


def _replace_attention(model: nn.Module) -> nn.Module:
    """Swap every timm ``block.attn`` for a ``reattn.ReAttention`` with its qkv/proj weights."""
    for block in model.blocks:
        old = block.attn
        dim, heads = old.qkv.in_features, old.num_heads
        new = reattn.ReAttention(dim=dim, num_heads=heads, qkv_bias=old.qkv.bias is not None)
        new.qkv.load_state_dict(old.qkv.state_dict())
        new.proj.load_state_dict(old.proj.state_dict())
        block.attn = new
    return model


def build_deepvit_16b() -> nn.Module:
    try:
        from reattn.models import deepvit_16b
    except ImportError:
        from timm.models.vision_transformer import VisionTransformer

        return _replace_attention(VisionTransformer(embed_dim=384, depth=16, num_heads=12, mlp_ratio=3,
                                                    qkv_bias=True))
    return deepvit_16b()


def build_deit_s_reattn() -> nn.Module:
    import timm

    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    swap = getattr(reattn, "swap_attention", None)
    if swap is None:
        return _replace_attention(model)
    return swap(model, norm="batch", mix_init="official")


@dataclass(frozen=True)
class ModelSpec:
    """How to build a benchmarked model and the square image size it takes."""

    build: Callable[[], nn.Module]
    image_size: int = 224


MODELS: Dict[str, ModelSpec] = {
    "DeepViT-16b": ModelSpec(build_deepvit_16b),
    "DeiT-S-reattn": ModelSpec(build_deit_s_reattn),
}


def set_backend(model: nn.Module, backend: str) -> int:
    """Point every ``ReAttention`` of ``model`` at ``backend``; returns how many there are."""
    count = 0
    for module in model.modules():
        if isinstance(module, reattn.ReAttention):
            module.backend = backend
            count += 1
    return count


def fused_backends(device: torch.device, excluded: Sequence[str] = ()) -> Dict[str, Optional[str]]:
    """Fused backends on ``device``: name -> None, or the reason it is not benchmarked."""
    from reattn.kernels.launch import interpreting

    result: Dict[str, Optional[str]] = {}
    for backend in reattn.available_backends(device):
        if backend == "eager":
            continue
        if backend in excluded:
            result[backend] = "excluded with --exclude"
        elif backend == "triton" and device.type == "cpu" and interpreting():
            result[backend] = "TRITON_INTERPRET=1 runs the Triton interpreter, a correctness tool: not benchmarked"
        else:
            result[backend] = None
    return result


# ----------------------------------------------------------------------------- measurement


def _step_function(model: nn.Module, mode: str, images: torch.Tensor, labels: torch.Tensor,
                   device: torch.device) -> Callable[[], None]:
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    if mode == "inference":
        model.eval()

        def infer() -> None:
            with torch.no_grad(), autocast:
                model(images)
        return infer
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
    return train_step


def measure_backends(model: nn.Module, mode: str, backends: Sequence[str], batch: int, device: torch.device,
                     warmup: int, steps: int, progress, image_size: int = 224) -> Dict[str, object]:
    """Milliseconds per step of ``model`` under each backend: backend -> Timing, or the exception it raised.

    The backends take turns step by step (warm-up steps first), so a change in the machine's load
    while the benchmark runs is spread over all of them. A monotonic clock around synchronized steps.
    """
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    step = _step_function(model, mode, images, labels, device)
    times: Dict[str, object] = {backend: [] for backend in backends}
    for index in range(warmup + steps):
        for backend in backends:
            if isinstance(times[backend], BaseException):
                continue
            set_backend(model, backend)
            try:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except Exception as error:  # noqa: BLE001 - reported per backend by the caller
                times[backend] = error
                continue
            finally:
                progress.update(1)
            if index >= warmup:
                times[backend].append((time.perf_counter() - start) * 1e3)
    return {backend: value if isinstance(value, BaseException)
            else common.Timing(statistics.median(value), common.quantile(value, 0.2), common.quantile(value, 0.8))
            for backend, value in times.items()}


def run_models(device: torch.device, models: Sequence[str], modes: Sequence[str], batch: int, warmup: int,
               steps: int, suite: str, machine: str = "", excluded: Sequence[str] = (),
               show_progress: bool = True) -> List[Dict[str, object]]:
    """One row per model x backend x mode (skipped and failed ones included)."""
    from tqdm import tqdm

    meta = common.run_metadata(device, machine)
    meta = dict(run_id=f"{meta['date']}-{meta['commit']}", **meta, suite=suite,
                precision="bf16 autocast" if device.type == "cuda" else "float32", batch=batch)
    fused = fused_backends(device, excluded)
    runnable = ["eager"] + [name for name, reason in fused.items() if reason is None]
    rows: List[Dict[str, object]] = []
    progress = tqdm(total=len(models) * len(runnable) * len(modes) * (warmup + steps), desc="whole models",
                    unit="step", disable=not show_progress)
    for model_name in models:
        torch.manual_seed(0)
        spec = MODELS[model_name]
        model = spec.build().to(device)
        blocks = set_backend(model, "eager")
        for mode in modes:
            progress.set_postfix_str(f"{model_name} {mode}")
            timings = measure_backends(model, mode, runnable, batch, device, warmup, steps, progress, spec.image_size)
            eager = timings["eager"]
            for backend in ["eager"] + list(fused):
                row: Dict[str, object] = dict(meta, model=model_name, image_size=spec.image_size,
                                              reattention_modules=blocks, backend=backend, mode=mode)
                timing = timings.get(backend)
                if timing is None:
                    rows.append(dict(row, status="skipped", note=fused[backend]))
                elif isinstance(timing, ValueError):
                    rows.append(dict(row, status="skipped", note=str(timing)))
                elif isinstance(timing, BaseException):
                    rows.append(dict(row, status="failed", note=f"{type(timing).__name__}: {timing}"[:300]))
                else:
                    speedup = eager.median_ms / timing.median_ms if isinstance(eager, common.Timing) else None
                    rows.append(dict(row, status="ok", median_ms=round(timing.median_ms, 2),
                                     p20_ms=round(timing.p20_ms, 2), p80_ms=round(timing.p80_ms, 2),
                                     images_per_s=round(batch * 1e3 / timing.median_ms, 2),
                                     speedup_vs_eager=round(speedup, 3) if speedup else "", note=""))
        del model
    progress.close()
    return rows


def print_table(rows: Sequence[Dict[str, object]]) -> None:
    if not rows:
        return
    first = rows[0]
    print(f"\nwhole models on {first['device']} ({first['precision']}, batch {first['batch']}, "
          f"{first['image_size']} px), "
          f"commit {first['commit']}, {first['date']}, load average {first['load_avg_1m']} at start")
    header = (f"{'model':<15}{'backend':<9}{'mode':<12}{'images/s':>10}{'median ms':>11}{'p20-p80 ms':>20}"
              f"{'vs eager':>10}")
    print(header)
    print("-" * len(header))
    for row in rows:
        if row["status"] != "ok":
            print(f"{row['model']:<15}{row['backend']:<9}{row['mode']:<12}{row['status']:>10}  {row['note']}")
            continue
        speedup = f"{row['speedup_vs_eager']:.2f}x" if row["speedup_vs_eager"] != "" else "-"
        spread = f"{row['p20_ms']:.1f}-{row['p80_ms']:.1f}"
        print(f"{row['model']:<15}{row['backend']:<9}{row['mode']:<12}{row['images_per_s']:>10.2f}"
              f"{row['median_ms']:>11.1f}{spread:>20}{speedup:>10}")


def default_settings(device: torch.device, quick: bool) -> Dict[str, int]:
    """Batch and step counts: a GPU-filling batch, or a CPU batch that keeps the quick suite short."""
    if device.type == "cuda":
        return dict(batch=128, warmup=3, steps=10) if quick else dict(batch=256, warmup=5, steps=30)
    return dict(batch=2, warmup=1, steps=3) if quick else dict(batch=16, warmup=1, steps=5)


def default_models(device: torch.device, quick: bool) -> List[str]:
    """Every model, except in the quick suite on CPU: DeepViT-16b alone (a training step takes seconds there)."""
    return ["DeepViT-16b"] if quick and device.type == "cpu" else list(MODELS)


def main_from_suite(device: torch.device, quick: bool, results: Path, models: Optional[Sequence[str]] = None,
                    modes: Sequence[str] = MODEL_MODES, machine: str = "", excluded: Sequence[str] = (),
                    **overrides: Optional[int]) -> List[Dict[str, object]]:
    """Run, print and append to ``results/models.csv``; the microbenchmark's entry point."""
    settings = dict(default_settings(device, quick), **{k: v for k, v in overrides.items() if v is not None})
    rows = run_models(device, list(models or default_models(device, quick)), modes,
                      suite="quick" if quick else "full", machine=machine, excluded=excluded, **settings)
    print_table(rows)
    path = results / "models.csv"
    common.append_csv(rows, path)
    print(f"appended {len(rows)} rows to {path}")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS))
    parser.add_argument("--modes", nargs="+", choices=MODEL_MODES, default=list(MODEL_MODES))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--results", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--machine", default="", help="a label of this computer for the CSV and README")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="BACKEND", help="fused backends to leave out")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads on CPU (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    main_from_suite(torch.device(args.device), args.quick, args.results, args.models, args.modes,
                    machine=args.machine, excluded=args.exclude, batch=args.batch, warmup=args.warmup,
                    steps=args.steps)


if __name__ == "__main__":
    main()
