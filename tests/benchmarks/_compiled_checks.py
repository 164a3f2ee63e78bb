"""Checks of the static model that compile kernels for sm_90, run in a process without Triton's interpreter.

The test process runs Triton kernels in the interpreter (TRITON_INTERPRET=1, tests/conftest.py),
where ``@triton.jit`` makes interpreted functions that cannot be compiled; these checks therefore
run as ``python -m tests.benchmarks._compiled_checks CHECK...``, started in the background when
tests/benchmarks/test_static_model.py is collected (``start``), and print one ``CHECK {json}`` line
each. ``python -m tests.benchmarks._compiled_checks regenerate`` rewrites data/toy_loops_sm90.sass.
"""
import json
import os
import subprocess
import sys
import tempfile
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKS = ("specialization", "loops", "crosscheck", "model")


def _toy_launch(M):
    import torch

    from reattn.kernels.capture import Launch
    from tests.benchmarks.toy_kernels import toy_loops_kernel

    x = torch.empty(4 * 2 * 100, device="meta")
    y = torch.empty(4 * 64, device="meta")
    return Launch(toy_loops_kernel, (4,), (x, y, 100, M), dict(BLOCK=64, CHUNKS=2, SCALE=True, num_warps=2))


def check_specialization():
    """The DeiT-S forward compiled as a real launch: unit strides constant, multiples of 16 hinted, its shared memory."""
    import torch

    from reattn.kernels.aot import compile_launch
    from reattn.kernels.capture import capture_launches
    from reattn.kernels.forward import re_attention_forward

    m = dict(device="meta", dtype=torch.bfloat16)
    q = torch.empty(256, 6, 197, 64, **m)
    w = torch.empty(6, 6, device="meta")
    c = torch.empty(6, device="meta")
    with capture_launches(90) as launches:
        re_attention_forward(q, q, q, w, c, scale=0.125, norm="layer", norm_weight=c, norm_bias=c)
    _, launch = launches  # the softmax statistics' launch, then the forward's
    compiled = compile_launch(launch.kernel, launch.args, launch.kwargs, 90)
    return dict(shared=compiled.shared, num_warps=compiled.num_warps, specialization=compiled.specialization,
                signature=compiled.signature, grid=list(launch.grid))


def check_loops():
    import torch
    import triton
    import triton.language as tl

    from benchmarks.source_loops import analyze

    launch = _toy_launch(3)
    loops, accesses = analyze(launch.kernel, launch.bound())
    tree = [dict(line=lp.line, trips=lp.trips, calls=[n for _, n in lp.calls],
                 children=[dict(line=c.line, trips=c.trips, calls=[n for _, n in c.calls]) for c in lp.children])
            for lp in loops]

    @triton.jit
    def _while_kernel(X, N):
        i = 0
        while i < N:
            i += 1
        tl.store(X, i)

    try:
        analyze(_while_kernel, dict(X=torch.empty(1, device="meta"), N=4))
        refused = ""
    except ValueError as error:
        refused = str(error)
    return dict(tree=tree, accesses={k: sorted(v) for k, v in accesses.items()}, while_refused=refused)


def check_crosscheck():
    """Counting by source loops and by emulating the SASS agree where both apply; the toy needs emulation."""
    from benchmarks import reference_fa, triton_side
    from reattn.backends.triton import TRITON_OPS

    out = {}
    events = reference_fa.call(2, 2, 40, 16, 90)["fwd"] + triton_side.fused_call(TRITON_OPS, 1, 2, 40, 16, "layer",
                                                                                 90)["fwd"]
    for launch in [e for e in events if hasattr(e, "kernel")]:
        a = triton_side.model_launch(launch, 90, "x", "fwd", method="loops")
        b = triton_side.model_launch(launch, 90, "x", "fwd", method="emulate")
        out[launch.name] = dict(loops=a.work.warp_instructions, emulated=b.work.warp_instructions,
                                tensor=[a.work.instructions.get("tensor", 0), b.work.instructions.get("tensor", 0)],
                                mufu=[a.work.instructions.get("mufu", 0), b.work.instructions.get("mufu", 0)])
    toy = {}
    for M in (0, 3, 9):
        model = triton_side.model_launch(_toy_launch(M), 90, "toy", "fwd")
        fma = model.work.instructions.get("fp32", 0)
        toy[M] = dict(note=model.note, fp32=fma, loops=[(r.source, r.trips) for r in model.loops])
    try:
        triton_side.model_launch(_toy_launch(3), 90, "toy", "fwd", method="loops")
        mismatch = ""
    except triton_side.LoopMismatch as error:
        mismatch = str(error)
    return dict(kernels=out, toy=toy, mismatch=mismatch)


def check_model():
    with tempfile.TemporaryDirectory() as tmp:
        readme = os.path.join(tmp, "README.md")
        with open(readme, "w") as f:
            f.write("# reattn\n\n## Building\n")
        csv_path = os.path.join(tmp, "static_model.csv")
        args = [sys.executable, "-m", "benchmarks.static_model", "--shapes", "DeepViT-16b", "--backends", "triton",
                "reference", "eager", "--norms", "layer", "none", "--archs", "90", "--gpu", "H100-SXM", "--record",
                "--csv", csv_path, "--readme", readme]
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=_env())
        import csv

        rows = list(csv.DictReader(open(csv_path))) if os.path.exists(csv_path) else []
        return dict(returncode=proc.returncode, stdout=proc.stdout[-6000:], stderr=proc.stderr[-3000:], rows=rows,
                    readme=open(readme).read())


def regenerate():
    import subprocess as sp

    from benchmarks import sass, triton_side

    compiled, _, _ = triton_side.compile_cached(_toy_launch(3), 90)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "toy.cubin")
        with open(path, "wb") as f:
            f.write(compiled.cubin)
        text = sp.run([sass.tool("nvdisasm"), "-c", "-gi", path], capture_output=True, text=True, check=True).stdout
    with open(os.path.join(REPO, "tests", "benchmarks", "data", "toy_loops_sm90.sass"), "w") as f:
        f.write(text.replace(REPO + "/", ""))


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def main(argv):
    if argv == ["regenerate"]:
        regenerate()
        return
    for name in argv or CHECKS:
        try:
            result = dict(ok=True, value=globals()[f"check_{name}"]())
        except Exception:  # noqa: BLE001 - reported to the test, which fails with it
            result = dict(ok=False, error=traceback.format_exc()[-4000:])
        print(f"CHECK {name} " + json.dumps(result, default=str), flush=True)


def _parse(returncode, out, err):
    parsed = {}
    for line in out.splitlines():
        if line.startswith("CHECK "):
            _, name, payload = line.split(" ", 2)
            parsed[name] = json.loads(payload)
    parsed["_stderr"] = err
    return parsed


_JOB = None


def _job():
    global _JOB
    if _JOB is None:
        from tests._background import Background

        _JOB = Background("tests.benchmarks._compiled_checks", parse=_parse)
    return _JOB


def start():
    """Start every check in one background process (idempotent)."""
    return _job().start()


def results(timeout=1500):
    """{check: result} of the background process, waiting for it."""
    return _job().results(timeout)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    main(sys.argv[1:])
