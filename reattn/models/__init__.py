"""The official DeepViT models on reattn's ``ReAttention``, and converters.

``deepvit_16b``/``deepvit_24b``/``deepvit_32b``, ``deepvit_s``, ``deepvit_l``, ``deepvit_l_384``
(or ``create_model`` with our names or the official ones) build models whose state_dict keys
are those of github.com/zhoudaquan/dvit_repo, so official checkpoints load strictly
(``load_official_checkpoint``). ``convert_vit_pytorch_deepvit`` maps a vit-pytorch ``DeepViT``
state_dict to the layout ``reattn.swap_attention`` gives that model.
"""
from reattn.models.convert import convert_vit_pytorch_deepvit
from reattn.models.deepvit import (
    OFFICIAL_NAMES,
    Block,
    ConvPatchEmbed,
    DeepVisionTransformer,
    HybridEmbed,
    PatchEmbed,
    create_model,
    deepvit_16b,
    deepvit_24b,
    deepvit_32b,
    deepvit_l,
    deepvit_l_384,
    deepvit_s,
    load_official_checkpoint,
    model_names,
)

__all__ = [
    "OFFICIAL_NAMES",
    "Block",
    "ConvPatchEmbed",
    "DeepVisionTransformer",
    "HybridEmbed",
    "PatchEmbed",
    "convert_vit_pytorch_deepvit",
    "create_model",
    "deepvit_16b",
    "deepvit_24b",
    "deepvit_32b",
    "deepvit_l",
    "deepvit_l_384",
    "deepvit_s",
    "load_official_checkpoint",
    "model_names",
]
