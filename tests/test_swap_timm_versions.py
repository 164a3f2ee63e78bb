"""reattn.swap_attention against older timm releases, each installed side by side.

tests/test_swap.py covers the timm in the project environment (the newest, as ``make`` installs
it unpinned). Here each release below is installed side by side and tests/_timm_swap_check.py runs
against it in a subprocess (tests/_timm_releases.py: a background process, a cache of wheels). The
script reports the features it found and the checks it ran; each test asserts both against the table,
so a release that lost a signature (or a check that stopped running) fails instead of passing with
less coverage.

Marked ``install``: it needs the package index the first time. Without it the test fails with
the pip error (it never skips); deselect with ``-m "not install"`` (``make test-fast``) offline.
"""
import json
from pathlib import Path

import pytest

from tests import _timm_releases

VIT = "timm.models.vision_transformer.Attention"
LAYERS = "timm.layers.attention.Attention"

# (version, where Attention is defined, Attention.forward arguments, attributes/constructor
# options it has, why this release). The releases bracket each change swap_attention depends on;
# 0.9.16 - 1.0.12 share one Attention class, so no release between them is listed (1.0.3, 1.0.9
# and 1.0.12 pass as well, run by hand); gated (1.0.28+) is covered with the project's own timm.
RELEASES = [
    ("0.6.13", VIT, ["x"], set(),
     "last before timm.layers: no fused_attn, head_dim, q_norm/k_norm"),
    ("0.9.16", VIT, ["x"], {"fused_attn", "qk_norm"},
     "SDPA path (fused_attn), qk_norm; timm.layers without Attention"),
    ("1.0.15", VIT, ["x"], {"fused_attn", "qk_norm", "proj_bias"},
     "last with Attention in vision_transformer.py (proj_bias from 1.0.13)"),
    ("1.0.16", LAYERS, ["x", "attn_mask"], {"fused_attn", "qk_norm", "proj_bias", "scale_norm"},
     "Attention moves to timm.layers; forward(x, attn_mask=); scale_norm"),
    ("1.0.25", LAYERS, ["x", "attn_mask"],
     {"fused_attn", "qk_norm", "proj_bias", "scale_norm", "attn_head_dim", "dim_out"},
     "last without is_causal (attn_head_dim, dim_out from 1.0.23)"),
    ("1.0.26", LAYERS, ["x", "attn_mask", "is_causal"],
     {"fused_attn", "qk_norm", "proj_bias", "scale_norm", "attn_head_dim", "dim_out"},
     "forward(x, attn_mask=, is_causal=)"),
]
FEATURES = ("fused_attn", "qk_norm", "scale_norm", "gated", "attn_head_dim", "dim_out", "proj_bias")
SHAPE_OPTIONS = ("attn_head_dim", "dim_out", "proj_bias")


def expected_checks(forward, features):
    """The check names tests/_timm_swap_check.py must report for a release with these features."""
    checks = ["identity_none_eval_train_backward"]
    if "qk_norm" in features:
        checks.append("identity_none_eval_train_backward_qk_norm")
    checks.append("identity_batch_eval")
    checks.append("diagnostics_cross_layer_similarity")
    if "fused_attn" in features:
        checks.append("unfused_original")
    checks.append("module_x")
    checks += [f"module_{name}" for name in forward[1:]]
    options = sorted(name for name in SHAPE_OPTIONS if name in features)
    if options:
        checks.append("module_options_" + "_".join(options))
    checks += [f"model_{name}" for name in forward[1:]]  # VisionTransformer.forward passes the same ones
    checks += [f"refuses_{name}" for name in ("scale_norm", "gated") if name in features]
    if "fused_attn" in features:
        checks.append("refuses_changed_scale_when_fused")
    return checks


@pytest.mark.install
@pytest.mark.parametrize("version,attention,forward,features,why", RELEASES, ids=[r[0] for r in RELEASES])
def test_swap_attention_with_older_timm(version, attention, forward, features, why):
    result = _timm_releases.result(version)
    if "error" in result:
        pytest.fail(result["error"], pytrace=False)
    path = result["path"]
    output = result["stdout"] + result["stderr"]
    assert result["returncode"] == 0, f"timm {version} ({why}):\n{output[-6000:]}"
    lines = [line for line in result["stdout"].splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, output[-6000:]
    report = json.loads(lines[0][len("RESULT "):])
    assert report["version"] == version
    assert Path(report["file"]).resolve() == (path / "timm" / "__init__.py").resolve(), report["file"]
    found = report["features"]
    assert found["attention"] == attention and found["forward"] == forward, found
    assert found["model_forward"] == forward[1:], found
    assert {name for name in FEATURES if found[name]} == features, found
    assert report["checks"] == expected_checks(forward, features)
