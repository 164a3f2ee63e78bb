"""Shared pieces of the benchmarks: run metadata, timing, peak memory, the cost model and CSV I/O.

Timing
  GPU: ``triton.testing.do_bench`` (CUDA events, its own warm-up and repetition budget, the L2
  cache flushed between calls), or a CUDA-event loop when triton is missing.
  CPU: ``warmup`` untimed calls, then ``reps`` calls timed one by one with ``time.perf_counter``
  (a monotonic clock). Every figure is the median with the 20th and 80th percentiles.

Peak memory (what the call allocates on top of what existed before it)
  GPU: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` before the call.
  CPU: torch's CPU allocator profiling: one call under ``torch.profiler`` with
  ``profile_memory=True``; the allocator reports every allocation and free of a tensor as a
  ``[memory]`` event; the peak is the maximum running sum of those byte counts over the call.
  This counts tensor storage only (the CPU analogue of ``max_memory_allocated``), not the
  allocator's or the interpreter's overhead, and frees of tensors made before the call are not
  reported, so they never lower the figure.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

# Before the profiler starts: kineto otherwise logs an error per profile on machines without a GPU.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- run metadata


def device_name(device: torch.device) -> str:
    """A human-readable device name: the GPU's name, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """Short hash of HEAD, with ``+dirty`` when tracked files under benchmarks/ or reattn/ differ."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=REPO_ROOT, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "reattn", "kernels",
                                "csrc", "benchmarks"], capture_output=True, text=True, cwd=REPO_ROOT,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


def run_metadata(device: torch.device, machine: str = "") -> Dict[str, str]:
    """The columns every CSV row carries: when, which code, which machine and software.

    ``machine`` is a free-form label of the computer (e.g. "2-core dev machine"), for the README.
    """
    return dict(
        machine=machine,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=git_commit(),
        device_type=device.type,
        device=device_name(device),
        torch=torch.__version__,
        cuda=torch.version.cuda or "",
        triton=triton_version(),
        # Other processes competing for the cores explain noisy CPU figures: record the load.
        load_avg_1m=f"{os.getloadavg()[0]:.2f}",
    )


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call."""

    median_ms: float
    p20_ms: float
    p80_ms: float


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (as numpy's default) of a non-empty sequence."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def time_calls(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    reps: int,
    before_each: Optional[Callable[[], None]] = None,
    grad_to_none: Sequence[torch.Tensor] = (),
) -> Timing:
    """Time ``fn``; ``before_each`` runs untimed before every call; ``grad_to_none`` are reset untimed."""

    def reset() -> None:
        for tensor in grad_to_none:
            tensor.grad = None
        if before_each is not None:
            before_each()

    if device.type == "cuda":
        return _time_cuda(fn, warmup, reps, reset, use_do_bench=before_each is None, grad_to_none=grad_to_none)
    for _ in range(warmup):
        reset()
        fn()
    times = []
    for _ in range(reps):
        reset()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(times), quantile(times, 0.2), quantile(times, 0.8))


@dataclass
class TimedCall:
    """A call to time; ``before_each`` runs untimed before every call, ``grad_to_none`` are reset untimed."""

    fn: Callable[[], object]
    before_each: Optional[Callable[[], None]] = None
    grad_to_none: Sequence[torch.Tensor] = ()

    def reset(self) -> None:
        for tensor in self.grad_to_none:
            tensor.grad = None
        if self.before_each is not None:
            self.before_each()


def time_interleaved(calls: Sequence[TimedCall], warmup: int, reps: int) -> List[object]:
    """CPU timing of several calls in turn: every repetition times each call once, round robin.

    On a machine shared with other jobs the load changes from second to second; timing the
    providers of a configuration in turn spreads those changes over all of them instead of
    charging them to whichever provider ran at the bad moment. Returns one ``Timing`` per call,
    or the exception a call raised (that call is then left out of later repetitions).
    """
    results: List[object] = [[] for _ in calls]
    for repetition in range(warmup + reps):
        for index, call in enumerate(calls):
            if isinstance(results[index], BaseException):
                continue
            try:
                call.reset()
                start = time.perf_counter()
                call.fn()
                elapsed_ms = (time.perf_counter() - start) * 1e3
            except Exception as error:  # noqa: BLE001 - reported to the caller per call
                results[index] = error
                continue
            if repetition >= warmup:
                results[index].append(elapsed_ms)
    return [result if isinstance(result, BaseException)
            else Timing(statistics.median(result), quantile(result, 0.2), quantile(result, 0.8))
            for result in results]


def _time_cuda(fn, warmup: int, reps: int, reset: Callable[[], None], use_do_bench: bool,
               grad_to_none: Sequence[torch.Tensor]) -> Timing:  # pragma: no cover - needs a GPU
    """GPU timing: triton's do_bench when no untimed setup is needed between calls, else CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None and use_do_bench:
        # do_bench resets grad_to_none untimed and flushes L2 before each call; its warm-up and
        # repetition budgets are in milliseconds.
        median, p20, p80 = do_bench(fn, warmup=25, rep=100, grad_to_none=list(grad_to_none) or None,
                                    quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80)
    for _ in range(warmup):
        reset()
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return Timing(statistics.median(times), quantile(times, 0.2), quantile(times, 0.8))


# ----------------------------------------------------------------------------- memory


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes of tensor memory ``fn`` allocates at its peak on top of what was allocated before it.

    The output of ``fn`` is kept alive until the peak is read, so it counts.
    """
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = [event for event in prof.profiler.kineto_results.events() if event.name() == "[memory]"]
    events.sort(key=lambda event: event.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's C++ side prints two lines per profile."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


# ----------------------------------------------------------------------------- cost model


def flops_model(batch: int, heads: int, n_query: int, n_key: int, head_dim: int, mode: str, norm: str) -> float:
    """FLOPs of one Re-attention call by the cost model below (the fused algorithm's matmuls).

    Per head, in units of one N x N x D matmul (2 * Nq * Nk * D FLOPs):
      forward  3 (Q K^T for the row statistics, Q K^T again, A V) + mixing H / D
               (+1 Q K^T for the training-mode BatchNorm statistics)
      backward 7 (pre-pass Q K^T and dO V^T; Q K^T, dO V^T, dV, dQ, dK) + mixing 2 H / D
    Mixing costs 2 H FLOPs per map entry per head (H multiply-adds), 4 H in the backward (dW and dP).
    This is the work of the fused algorithm; every provider is charged the same count, so
    TFLOP/s compare like speed-ups do (an eager provider does less arithmetic and moves more bytes).
    """
    matmul = 2.0 * n_query * n_key * head_dim
    forward_units = 3.0 + heads / head_dim + (1.0 if norm == "batch-train" else 0.0)
    backward_units = 7.0 + 2.0 * heads / head_dim
    units = {"fwd": forward_units, "bwd": backward_units, "fwd+bwd": forward_units + backward_units}[mode]
    return batch * heads * units * matmul


def bytes_model(batch: int, heads: int, n_query: int, n_key: int, head_dim: int, mode: str, element_size: int) -> float:
    """Bytes the op must move at least: each [B, H, N, D] operand read or written once.

    forward: read q, k, v, write O; backward: read q, k, v, dO, write dq, dk, dv. The H x H
    parameters and the per-row statistics are negligible and left out.
    """
    q_bytes = batch * heads * n_query * head_dim * element_size
    kv_bytes = batch * heads * n_key * head_dim * element_size
    forward = 2 * q_bytes + 2 * kv_bytes
    backward = 3 * q_bytes + 4 * kv_bytes
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]


# ----------------------------------------------------------------------------- CSV


def append_csv(rows: List[Dict[str, object]], path: Path) -> None:
    """Append ``rows`` to ``path``; if the file has other columns, rewrite it with the union of both."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_fields = list(reader.fieldnames or [])
            old_rows = list(reader)
        if old_fields != fields:
            merged = list(dict.fromkeys(old_fields + fields))
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=merged, restval="")
                writer.writeheader()
                writer.writerows(old_rows)
                writer.writerows(rows)
            return
        with path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=old_fields, restval="").writerows(rows)
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> List[Dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def latest_run(rows: List[Dict[str, str]], device_type: Optional[str] = None) -> List[Dict[str, str]]:
    """The rows of the most recent run (one ``run_id``), optionally of one device type."""
    rows = [row for row in rows if row.get("run_id") and (device_type is None or row.get("device_type") == device_type)]
    if not rows:
        return []
    last = max(rows, key=lambda row: row["date"])["run_id"]
    return [row for row in rows if row["run_id"] == last]
