"""Resources of every Triton kernel at the launch rule's configurations, compiled as real launches.

For each kernel variant a DeepViT-style call launches (no mask, no dropout, bf16: the forward with
norm none, LayerNorm, given batch statistics, and the one-sweep BatchNorm moments; the Gram-sums
statistics sweep; the backward with norm none, LayerNorm, training BatchNorm, and its sums sweep) at
the named shapes and H in {1, 6, 12, 16, 32} x D in {16, 33, 64, 128}: capture the launch
(``kernels.capture``: the rule picks the configuration for the target's shared memory, or refuses
the shape there, which launches nothing and is left out) and group the
configurations by what the compiled code depends on: the variant, the target, the launch
configuration (HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, warps, stages) and whether D is a multiple of
16 (the JIT's divisibility hint on D changes the shared memory: 115,200 B against 74,240 at DeiT-S's
D = 64 and D = 35). One representative per group is compiled: the configuration with the most
divisibility hints (H a multiple of 16 where the group has one), the heaviest. Targets: every
variant on sm_90 (the spill guard); the heaviest variant of each kernel (forward with LayerNorm, the
statistics sweep, the backward with LayerNorm) also on sm_80 and sm_86 (the shared-memory guard).

Compiles are slow (seconds to a minute each, about a hundred and forty), so results are kept in
``data/resources.json`` keyed by a hash of the kernel source (with its jit helpers), the JIT's
signature, constexprs, specialization attributes and options of the representative's launch, the
target and the Triton version: an entry whose key no longer matches is compiled again, never
trusted. Regenerate the file after changing a kernel or the launch rule (an hour or two on one core):

    python -m tests.kernels._resources --update

``python -m tests.kernels._resources`` prints one ``RESOURCE {json}`` line per distinct compile
(tests/kernels/test_resources.py runs it in the background at collection).
"""
import hashlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(REPO, "tests", "kernels", "data", "resources.json")

NAMED = [("DeiT-S", 6, 64), ("DeepViT-16b", 12, 32), ("ViT-B", 12, 64), ("DeepViT-L-384", 12, 35)]
HEADS = (1, 6, 12, 16, 32)
HEAD_DIMS = (16, 33, 64, 128)
CAPS = (80, 86, 90)
VARIANTS = ("forward-none", "forward-layer", "forward-batch", "forward-moments", "bn_stats", "backward-none",
            "backward-layer", "backward-batch", "backward-sums")
N = 197


SHARED_VARIANTS = ("forward-layer", "bn_stats", "backward-layer")  # the heaviest of each kernel


def configs():
    shapes = [(name, h, d) for name, h, d in NAMED] + [(f"H{h}-D{d}", h, d) for h in HEADS for d in HEAD_DIMS]
    return [dict(variant=v, shape=s, h=h, d=d, cap=cap) for cap in CAPS for v in VARIANTS for s, h, d in shapes
            if cap == 90 or v in SHARED_VARIANTS]


def group_of(cfg, launch):
    """What the compiled code depends on (see the module doc)."""
    c = launch.constexprs()
    o = launch.options()
    return "|".join(str(x) for x in (cfg["variant"], cfg["cap"], c["HP"], c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"],
                                     c["D_CHUNKS"], o.get("num_warps"), o.get("num_stages"), cfg["d"] % 16 == 0))


def capture(variant, h, d, cap):
    """The launch ``variant`` makes at [2, h, N, d] bf16 on a GPU of compute capability ``cap``."""
    import torch

    from reattn.kernels.backward import re_attention_backward, re_attention_backward_bn_sums
    from reattn.kernels.bn_stats import gram_sums
    from reattn.kernels.capture import capture_launches
    from reattn.kernels.forward import re_attention_forward

    m = dict(device="meta", dtype=torch.bfloat16)
    q, k, v, do = (torch.empty(2, h, N, d, **m) for _ in range(4))
    f32 = dict(device="meta", dtype=torch.float32)
    w, c, nw, nb = torch.empty(h, h, **f32), torch.empty(h, **f32), torch.empty(h, **f32), torch.empty(h, **f32)
    lse = torch.empty(2, h, N, **f32)
    scale = d ** -0.5
    with capture_launches(cap) as launches:
        kind, _, norm = variant.partition("-")
        if kind == "forward":
            if norm == "moments":
                re_attention_forward(q, k, v, w, c, scale=scale, out=torch.empty(2, h, N, d, **f32), with_moments=True)
            elif norm == "batch":
                re_attention_forward(q, k, v, w, c, scale=scale, norm="batch", norm_weight=nw, norm_bias=nb,
                                     batch_stats=torch.empty(2, h, **f32), lse=lse, lse_is_input=True)
            else:
                re_attention_forward(q, k, v, w, c, scale=scale, norm=norm, norm_weight=nw if norm != "none" else None,
                                     norm_bias=nb if norm != "none" else None)
        elif kind == "bn_stats":
            gram_sums(q, k, scale=scale, shift=1.0 / N)
        elif norm == "sums":
            re_attention_backward_bn_sums(do, q, k, v, w, c, lse, scale=scale, norm_weight=nw, norm_bias=nb,
                                          batch_stats=torch.empty(2, h, **f32))
        else:
            re_attention_backward(do, q, k, v, w, c, lse, scale=scale, norm=norm,
                                  norm_weight=nw if norm != "none" else None, norm_bias=nb if norm != "none" else None,
                                  batch_stats=torch.empty(4, h, **f32) if norm == "batch" else None)
    (launch,) = launches
    return launch


def compile_key(launch, cap) -> str:
    import triton

    from reattn.kernels.aot import jit_compile_inputs

    target, backend, signature, constexprs, attrs, options, _ = jit_compile_inputs(launch.kernel, launch.args,
                                                                                   launch.kwargs, cap)
    text = repr((launch.kernel.cache_key, sorted(signature.items()), sorted(map(repr, constexprs.items())),
                 sorted(map(repr, attrs.items())), sorted(options.__dict__.items(), key=str), cap,
                 triton.__version__))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def compile_resources(launch, cap) -> dict:
    from benchmarks import sass
    from reattn.kernels.aot import compile_launch

    compiled = compile_launch(launch.kernel, launch.args, launch.kwargs, cap)
    function = sass.disassemble(compiled.cubin)[compiled.name]
    res = sass.resource_usage(compiled.cubin)[compiled.name]
    return dict(registers=res.registers, spill_bytes=sass.spill_bytes(res, function), shared=compiled.shared,
                static_shared=res.shared_static, num_warps=compiled.num_warps,
                config={k: launch.constexprs()[k] for k in ("HP", "BLOCK_M", "BLOCK_N", "BLOCK_D", "D_CHUNKS")})


def evaluate(update=False, out=sys.stdout):
    """{group: {key, cached, resources, representative, configs}} (see the module doc)."""
    cache = {}
    if os.path.exists(DATA):
        with open(DATA) as f:
            cache = json.load(f).get("entries", {})
    groups = {}
    for cfg in configs():
        try:
            launch = capture(cfg["variant"], cfg["h"], cfg["d"], cfg["cap"])
        except ValueError:  # the rule refuses the shape on this GPU (too little shared memory): nothing launches
            continue
        g = groups.setdefault(group_of(cfg, launch), dict(configs=[], representative=None))
        g["configs"].append(cfg)
        rep = g["representative"]
        if rep is None or (cfg["h"] % 16 == 0 and rep["h"] % 16 != 0):
            g["representative"] = cfg
    results = {}
    for name, g in groups.items():
        rep = g["representative"]
        launch = capture(rep["variant"], rep["h"], rep["d"], rep["cap"])
        key = compile_key(launch, rep["cap"])
        entry = cache.get(name)
        cached = entry is not None and entry.get("key") == key
        resources = entry["resources"] if cached else compile_resources(launch, rep["cap"])
        results[name] = dict(key=key, cached=cached, resources=resources, representative=rep, configs=g["configs"])
        if out is not None:
            print("RESOURCE " + json.dumps(dict(group=name, **{k: v for k, v in results[name].items()
                                                              if k != "configs"})), file=out, flush=True)
    if update:
        import triton

        with open(DATA, "w") as f:
            json.dump(dict(triton=triton.__version__, entries={n: dict(key=r["key"], resources=r["resources"],
                                                                       representative=r["representative"])
                                                                for n, r in results.items()}), f, indent=1,
                      sort_keys=True)
    return results


def _parse(returncode, out, err):
    parsed = {}
    for line in out.splitlines():
        if line.startswith("SUMMARY "):
            parsed = json.loads(line[8:])
    return returncode, parsed, err


_JOB = None


def _job():
    global _JOB
    if _JOB is None:
        from tests._background import Background

        _JOB = Background("tests.kernels._resources", "--summary", parse=_parse)
    return _JOB


def start():
    return _job().start()


def results(timeout=3600):
    """(returncode, {group: result with every configuration in it}, stderr tail)."""
    return _job().results(timeout)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if "--update" in sys.argv:
        evaluate(update=True)
    elif "--summary" in sys.argv:
        print("SUMMARY " + json.dumps(evaluate(out=None)), flush=True)
    else:
        evaluate()
