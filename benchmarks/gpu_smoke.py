"""The compiled kernels against float64 on a GPU: one table, every norm mode, forward and backward.

    python -m benchmarks.gpu_smoke --backend cuda [--dtypes bf16 fp32] [--shapes small]

The first thing a GPU session runs (``benchmarks/gpu_session.sh smoke``): the test suite is too large
for a short lease, and a kernel that faults would take the process's CUDA context, and every test
after it, down with it. So each backend runs in its own process, and each case prints one line as it
finishes:

    backend dtype norm B H N D | out err/ref | dq dk dv dW ... err/ref | kernel err / eager err | verdict

``err/ref`` is max |x - x_ref| / max |x_ref| against ``re_attention_ref`` on float64 copies of the
inputs (the same dropout-free call; the parameters' gradients as one vector); ``kernel/eager`` is the
largest ratio of the kernel's error to the eager backend's in the same dtype (FlashAttention's rule: at
most 2, with a floor where eager happens to be exact: see ``run``). NaN or inf anywhere fails.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

NORMS = ("none", "batch-eval", "batch-train", "layer")
# (B, H, N, D): DeiT-S's, DeepViT-16b's and ViT-B's heads at N = 197, DeepViT-L-384's at N = 577, and odd ones
# (12 heads at D = 64 and 35: the Triton backward's split sweeps without and with a head-dim tail).
SHAPES = {
    "small": [(2, 6, 197, 64), (2, 12, 197, 32), (2, 12, 197, 64), (1, 12, 577, 35), (3, 1, 33, 33),
              (2, 16, 50, 128)],
    "model": [(2, 6, 197, 64), (1, 12, 577, 35)],
    "tiny": [(2, 3, 17, 16)],  # the script's own test, on CPU
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Unit roundoff of each dtype: the floor of the 2x rule where eager's error is itself ~0.
ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}


def norm_kwargs(norm: str, H: int, gen: torch.Generator, device) -> dict:
    """re_attention's norm arguments with random-looking parameters (float32, as a module holds them)."""
    kw = dict(mix_weight=torch.eye(H) + 0.3 * torch.randn(H, H, generator=gen), mix_bias=0.1 * torch.randn(H, generator=gen))
    if norm == "none":
        kw.update(norm="none", training=False)
    elif norm == "layer":
        kw.update(norm="layer", norm_weight=1 + 0.2 * torch.randn(H, generator=gen),
                  norm_bias=0.1 * torch.randn(H, generator=gen), training=False)
    else:
        # Eval statistics near those of a real map (mean ~ 1/N, small variance) keep A of order one.
        kw.update(norm="batch", norm_weight=1 + 0.2 * torch.randn(H, generator=gen),
                  norm_bias=0.1 * torch.randn(H, generator=gen), running_mean=0.01 * torch.rand(H, generator=gen),
                  running_var=1e-4 * (1 + torch.rand(H, generator=gen)), training=norm == "batch-train")
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


PARAMS = ("mix_weight", "mix_bias", "norm_weight", "norm_bias")


def one_call(backend: str, q, k, v, grad, kw: dict, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """out and the gradients of q, k, v and the parameters, computing in ``dtype`` (float64 for the reference)."""
    import reattn

    inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    kw = {n: (t.detach().clone() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    params = {n: kw[n].requires_grad_() for n in PARAMS if n in kw}
    if dtype == torch.float64:
        kw = {n: (t.double() if isinstance(t, torch.Tensor) and n not in params else t) for n, t in kw.items()}
        kw.update({n: t.double() for n, t in params.items()})  # grads flow to the float32 leaves through .double()
        out = reattn.re_attention_ref(*inputs, kw.pop("mix_weight"), kw.pop("mix_bias"), **kw)
    else:
        out = reattn.re_attention(*inputs, kw.pop("mix_weight"), kw.pop("mix_bias"), backend=backend, **kw)
    out.backward(grad.to(dtype))
    result = {"out": out.detach()}
    result.update({n: t.grad for n, t in zip(("dq", "dk", "dv"), inputs)})
    result.update({"d" + n.replace("mix_", "").replace("norm_", "n"): t.grad for n, t in params.items()})
    return result


def relative_errors(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """max |got - ref| / max |ref| for out, dq, dk, dv, and for the parameters' gradients as one vector
    ("dparams"): with training BatchNorm the mixing bias's gradient is exactly zero (the norm removes
    any shift of M), so only the vector as a whole has a scale to be relative to."""
    def flat(result, names):
        parts = [result[n].double().flatten() for n in names if result.get(n) is not None]
        return torch.cat(parts) if parts else None

    errors = {}
    params = [n for n in ref if n not in ("out", "dq", "dk", "dv")]
    for name, names in [(n, [n]) for n in ("out", "dq", "dk", "dv")] + [("dparams", params)]:
        have, want = flat(got, names), flat(ref, names)
        if have is None or want is None or have.shape != want.shape:
            errors[name] = math.nan
        elif not torch.isfinite(have).all():
            errors[name] = math.inf
        else:
            scale = want.abs().max().item()
            errors[name] = (have - want).abs().max().item() / (scale if scale > 0 else 1.0)
    return errors


def run(backend: str, dtypes: Sequence[torch.dtype], shapes: Sequence[Tuple[int, int, int, int]],
        norms: Sequence[str], device: torch.device) -> int:
    failures = 0
    print(f"{'backend':7} {'dtype':8} {'norm':11} {'B':>2} {'H':>2} {'N':>4} {'D':>3} | {'out':>8} "
          f"{'worst grad':>16} | {'kernel/eager':>12} | verdict", flush=True)
    for dtype in dtypes:
        for B, H, N, D in shapes:
            for norm in norms:
                gen = torch.Generator().manual_seed(zlib.crc32(f"{B} {H} {N} {D} {norm}".encode()))
                q, k, v, grad = (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64).to(device)
                                 for _ in range(4))
                kw = norm_kwargs(norm, H, gen, device)
                start = time.perf_counter()
                try:
                    ref = one_call("eager", q, k, v, grad, kw, torch.float64)
                    eager = relative_errors(one_call("eager", q, k, v, grad, kw, dtype), ref)
                    got = relative_errors(one_call(backend, q, k, v, grad, kw, dtype), ref)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                except Exception as error:  # noqa: BLE001  (reported, and the process stops if CUDA broke)
                    failures += 1
                    print(f"{backend:7} {str(dtype)[6:]:8} {norm:11} {B:2} {H:2} {N:4} {D:3} | ERROR "
                          f"{type(error).__name__}: {str(error).splitlines()[0][:300]}", flush=True)
                    if "CUDA" in str(error) or "cuda" in type(error).__name__.lower():
                        print("CUDA error: the context is gone; stopping this backend", flush=True)
                        return failures
                    continue
                grads = {n: e for n, e in got.items() if n != "out"}
                worst = max(grads, key=lambda n: grads[n] if not math.isnan(grads[n]) else -1)
                # Where eager happens to be exact the 2x rule needs a floor: a few roundings in half
                # precision (whose errors come from rounding the inputs); in fp32, where the two differ
                # only in the order of their sums, the growth of a sum over Nk keys and H heads.
                u = ROUNDOFF[dtype]
                floor = 4 * u * (math.sqrt(N * H) if dtype == torch.float32 else 1.0)
                ratio = max(got[n] / max(eager[n], floor) for n in got if not math.isnan(got[n]))
                bad = any(math.isinf(e) for e in got.values()) or ratio > 2.0
                failures += bad
                print(f"{backend:7} {str(dtype)[6:]:8} {norm:11} {B:2} {H:2} {N:4} {D:3} | {got['out']:8.2e} "
                      f"{worst:>5} {grads[worst]:10.2e} | {ratio:12.2f} | {'FAIL' if bad else 'ok'} "
                      f"({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"{backend}: {failures} failing case(s)", flush=True)
    return failures


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", required=True, choices=["cuda", "triton", "eager"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--shapes", default="small", choices=list(SHAPES))
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=list(NORMS))
    parser.add_argument("--device", default="cuda", help="cuda (the session); cpu runs the script's own test")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU here", file=sys.stderr)
        return 2
    failures = run(args.backend, [DTYPES[d] for d in args.dtypes], SHAPES[args.shapes], args.norms,
                   torch.device(args.device))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
