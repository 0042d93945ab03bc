"""Export a backbone to a folder that Hugging Face ``transformers`` or ``timm`` loads as its own model.

- ``save_hf(backbone, out)``: ``config.json`` + ``model.safetensors`` for ``transformers.ViTModel``
  (``ViTModel.from_pretrained(out, add_pooling_layer=False)``; its ``last_hidden_state`` is our
  ``forward_features``). The keys are transformers 4's names (``encoder.layer.0.attention.attention.query``);
  transformers 5 converts them on load, so one folder serves both. With an MAE given, the
  encoder and its decoder also go to ``out/mae`` for ``transformers.ViTMAEForPreTraining``.
- ``save_timm(backbone, out)``: ``config.json`` (``architecture``, ``model_args``,
  ``pretrained_cfg``) + ``model.safetensors`` for ``timm.create_model("local-dir:OUT", pretrained=True)``
  (timm 1.0.16 or newer); our keys already are timm's.
- ``hf_state_dict`` / ``hf_config``: the renaming and the configuration, for tests and scripts.

Both write a ``README.md`` that says how to load the folder and where the libraries differ from
``vitssl_core``: at another image size HF resamples the position table bicubically (with
``interpolate_pos_encoding=True``), where a sin-cos card here recomputes its table. Architectures
that ``ViTModel`` cannot express (LayerScale, a final norm after pooling) are refused with a
``ValueError``; the classifier head, if any, is not exported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from .mae import MAE, decoder_state_dict
from .vit import ViT, architecture

__all__ = ["FORMATS", "hf_config", "hf_state_dict", "save_hf", "save_timm", "timm_config"]

FORMATS = ("hf", "timm")
LAYER_NORM_EPS = 1e-6  # every LayerNorm here; HF's ViT default is 1e-12
WEIGHTS = "model.safetensors"


# --------------------------------------------------------------------------- checks and renaming
def _check_backbone(backbone: ViT) -> None:
    if not isinstance(backbone, ViT):
        raise TypeError(f"backbone must be a vitssl_core.ViT, got {type(backbone).__name__}")
    if any(k.endswith(("ls1.gamma", "ls2.gamma")) for k in backbone.state_dict()):
        raise ValueError("backbone has LayerScale (init_values is set), which transformers' ViTModel lacks")
    if isinstance(backbone.norm, torch.nn.Identity):
        raise ValueError("backbone normalises after pooling (fc_norm=True); the export needs the final norm")
    if backbone.img_size[0] != backbone.img_size[1]:
        raise ValueError(f"backbone takes {backbone.img_size} images; the export needs square ones")


def _blocks_to_hf(state: dict[str, Tensor], src: str, dst: str, depth: int) -> dict[str, Tensor]:
    """timm block keys ``{src}{i}.attn.qkv`` ... -> transformers 4 keys ``{dst}{i}.attention.attention.query`` ..."""
    out = {}
    for i in range(depth):
        a, b = f"{src}{i}.", f"{dst}{i}."
        for kind in ("weight", "bias"):
            if f"{a}attn.qkv.{kind}" in state:  # (3D, D) / (3D,): query, key, value stacked in that order
                for name, part in zip(("query", "key", "value"), state[f"{a}attn.qkv.{kind}"].chunk(3, dim=0)):
                    out[f"{b}attention.attention.{name}.{kind}"] = part
            for ours, theirs in (
                ("attn.proj", "attention.output.dense"),
                ("norm1", "layernorm_before"),
                ("norm2", "layernorm_after"),
                ("mlp.fc1", "intermediate.dense"),
                ("mlp.fc2", "output.dense"),
            ):
                out[f"{b}{theirs}.{kind}"] = state[f"{a}{ours}.{kind}"]
    return out


def hf_state_dict(backbone: ViT, prefix: str = "") -> dict[str, Tensor]:
    """The backbone's tensors under ``transformers.ViTModel``'s (v4) names, float32; ``prefix`` e.g. ``"vit."``."""
    _check_backbone(backbone)
    s = {k: v.detach().float().cpu() for k, v in backbone.state_dict().items()}
    out = {
        "embeddings.cls_token": s["cls_token"],  # (1, 1, D)
        "embeddings.position_embeddings": s["pos_embed"],  # (1, 1+L, D)
        "embeddings.patch_embeddings.projection.weight": s["patch_embed.proj.weight"],  # (D, C, P, P)
        "embeddings.patch_embeddings.projection.bias": s["patch_embed.proj.bias"],
        **_blocks_to_hf(s, "blocks.", "encoder.layer.", len(backbone.blocks)),
        "layernorm.weight": s["norm.weight"],
        "layernorm.bias": s["norm.bias"],
    }
    return {prefix + k: v.contiguous() for k, v in out.items()}


def hf_config(backbone: ViT) -> dict[str, Any]:
    """``ViTConfig`` fields that rebuild the backbone in transformers (``model_type: vit``)."""
    _check_backbone(backbone)
    return {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "hidden_size": backbone.embed_dim,
        "num_hidden_layers": len(backbone.blocks),
        "num_attention_heads": backbone.num_heads,
        "intermediate_size": backbone.blocks[0].mlp.fc1.out_features,
        "hidden_act": "gelu",  # the exact (erf) GELU, as nn.GELU()
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": LAYER_NORM_EPS,
        "qkv_bias": backbone.blocks[0].attn.qkv.bias is not None,
        "image_size": backbone.img_size[0],  # a dynamic-size backbone exports at the size it was built for
        "patch_size": backbone.patch_size,
        "num_channels": backbone.in_chans,
        "encoder_stride": backbone.patch_size,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


def _mae_config(mae: MAE) -> dict[str, Any]:
    """``ViTMAEConfig`` fields for the encoder and decoder of ``mae`` (``model_type: vit_mae``)."""
    config = hf_config(mae.backbone)
    block = mae.decoder_blocks[0]
    return {
        **config,
        "architectures": ["ViTMAEForPreTraining"],
        "model_type": "vit_mae",
        "decoder_hidden_size": mae.decoder_embed.out_features,
        "decoder_num_hidden_layers": len(mae.decoder_blocks),
        "decoder_num_attention_heads": block.attn.num_heads,
        "decoder_intermediate_size": block.mlp.fc1.out_features,
        "mask_ratio": mae.mask_ratio,
        "norm_pix_loss": mae.norm_pix_loss,
    }


def _mae_state_dict(mae: MAE) -> dict[str, Tensor]:
    """``ViTMAEForPreTraining``'s (v4) names: the encoder under ``vit.``, the decoder under ``decoder.``."""
    s = {k: v.detach().float().cpu() for k, v in decoder_state_dict(mae.state_dict()).items()}
    out = {
        "decoder.mask_token": s["mask_token"],  # (1, 1, Dd)
        "decoder.decoder_pos_embed": s["decoder_pos_embed"],  # (1, 1+L, Dd), fixed sin-cos
        **_blocks_to_hf(s, "decoder_blocks.", "decoder.decoder_layers.", len(mae.decoder_blocks)),
    }
    for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
        for kind in ("weight", "bias"):
            out[f"decoder.{name}.{kind}"] = s[f"{name}.{kind}"]
    return {**hf_state_dict(mae.backbone, prefix="vit."), **{k: v.contiguous() for k, v in out.items()}}


# --------------------------------------------------------------------------- timm
def timm_config(backbone: ViT, normalize: dict | None = None) -> dict[str, Any]:
    """timm's hub ``config.json``: ``architecture``, ``model_args`` (our ViT keywords) and ``pretrained_cfg``."""
    _check_backbone(backbone)
    size = backbone.img_size[0]
    # our ViT keywords are timm's, but for the positions' kind: timm's "learn" table holds ours, learned or sin-cos
    model_args = {k: v for k, v in architecture(backbone).items() if k != "pos_embed"}
    mean, std = (normalize or {}).get("mean", [0.5]), (normalize or {}).get("std", [0.5])
    return {
        "architecture": "vit_base_patch16_224",  # timm's ViT; model_args override every size
        "num_classes": 0,
        "num_features": backbone.embed_dim,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [backbone.in_chans, size, size],
            "fixed_input_size": not backbone.dynamic_img_size,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


# --------------------------------------------------------------------------- writing
def _readme(fmt: str, backbone: ViT, card: dict[str, Any] | None, mae: bool) -> str:
    card = card or {}
    norm = card.get("normalize") or {}
    size = backbone.img_size[0]
    source = card.get("name") or card.get("method") or "a vitssl_core backbone"
    load = (
        "```python\nfrom transformers import ViTModel\n\n"
        'model = ViTModel.from_pretrained("THIS_FOLDER", add_pooling_layer=False).eval()\n'
        f"tokens = model(pixel_values).last_hidden_state   # (B, 1+L, {backbone.embed_dim}), = forward_features\n```\n"
        if fmt == "hf"
        else "```python\nimport timm\n\n"
        'model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True).eval()   # timm >= 1.0.16\n'
        f"tokens = model.forward_features(pixel_values)   # (B, 1+L, {backbone.embed_dim})\n```\n"
    )
    lines = [
        f"# {source}, exported by vitssl_core for {'Hugging Face transformers' if fmt == 'hf' else 'timm'}",
        "",
        f"A ViT with {len(backbone.blocks)} blocks of width {backbone.embed_dim}, {backbone.num_heads} heads, "
        f"{backbone.patch_size}x{backbone.patch_size} patches on {size}x{size} images with "
        f"{backbone.in_chans} channel(s).",
        "",
        load,
        f"`pixel_values` are float images (B, {backbone.in_chans}, {size}, {size}) in [0, 1], normalised with "
        f"mean {norm.get('mean', 'as trained')} and std {norm.get('std', 'as trained')}.",
    ]
    if card.get("feature"):
        lines += ["", f"Probes read the feature `{card['feature']}` (cls: token 0; avg: the mean of tokens 1..L)."]
    kind = "learned" if backbone.pos_embed_type == "learned" else "fixed 2-D sin-cos"
    lines += [
        "",
        f"Other image sizes: the position table ({kind}) was exported at {size}x{size}"
        + (" (the backbone was trained at several sizes)" if backbone.dynamic_img_size else "")
        + ". "
        + (
            "HF resamples it bicubically when called with `interpolate_pos_encoding=True`, "
            if fmt == "hf"
            else "timm resamples it bicubically (`dynamic_img_size=True` or `set_input_size`), "
        )
        + "where vitssl_core "
        + (
            "recomputes the sin-cos table for the new grid"
            if kind != "learned"
            else "resamples it bicubically with antialiasing"
        )
        + ", so features at other sizes differ slightly from vitssl_core's.",
    ]
    if mae:
        lines += [
            "",
            "`mae/` holds the encoder with MAE's decoder for `transformers.ViTMAEForPreTraining` "
            "(`ViTMAEForPreTraining.from_pretrained('THIS_FOLDER/mae')`; pass `noise=` to fix the mask).",
        ]
    return "\n".join(lines) + "\n"


def _write(out: Path, config: dict[str, Any], state: dict[str, Tensor]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})  # transformers refuses files without it


def save_hf(backbone: ViT, out: str | os.PathLike, card: dict[str, Any] | None = None, mae: MAE | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` for ``transformers.ViTModel`` to ``out``.

    ``mae`` (whose encoder is ``backbone``) adds ``out/mae`` for ``ViTMAEForPreTraining``.
    ``card`` (a checkpoint card) names the source and the normalisation in the README.
    Raises ValueError for an architecture ViTModel cannot express. Returns ``out``.
    """
    out = Path(out)
    if mae is not None and mae.backbone is not backbone:
        raise ValueError("mae must be the MAE whose encoder is backbone")
    _write(out, hf_config(backbone), hf_state_dict(backbone))
    if mae is not None:
        _write(out / "mae", _mae_config(mae), _mae_state_dict(mae))
    (out / "README.md").write_text(_readme("hf", backbone, card, mae is not None))
    return out


def save_timm(backbone: ViT, out: str | os.PathLike, card: dict[str, Any] | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` for ``timm.create_model("local-dir:OUT")``.

    Raises ValueError for an architecture timm's ViT cannot express here. Returns ``out``.
    """
    out = Path(out)
    config = timm_config(backbone, (card or {}).get("normalize"))
    state = {k: v.detach().float().cpu().contiguous() for k, v in backbone.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # the backbone only
    _write(out, config, state)
    (out / "README.md").write_text(_readme("timm", backbone, card, False))
    return out
