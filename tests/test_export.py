"""Exports for Hugging Face transformers and timm (vitssl_core/export.py, `vitssl export`).

Every export is loaded by the real library and its outputs compared with ours: equal outputs are
what catch a key that was renamed wrong or silently dropped.
"""

from __future__ import annotations

import json

import pytest
import torch

from vitssl_core import ViT, vit_mini_28
from vitssl_core import __main__ as cli
from vitssl_core.checkpoint import save_backbone
from vitssl_core.pretrained import load_pretrained, resolve_checkpoint
from vitssl_core.export import hf_config, hf_state_dict, save_hf, save_timm
from vitssl_core.mae import MAE
from vitssl_core.vit import architecture
from vitssl_core.visualize import load_mae

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")


def tiny(**kw) -> ViT:
    torch.manual_seed(0)
    return ViT(**{**dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2), **kw}).eval()


def hf_features(folder, x):
    model, info = transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(x).last_hidden_state


def timm_features(folder, x):
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        return model.forward_features(x)


def ours(backbone, x):
    with torch.no_grad():
        return backbone.forward_features(x)


# --------------------------------------------------------------------------- the library
@pytest.mark.parametrize("kw", [{}, {"qkv_bias": False}, {"pos_embed": "sincos", "mlp_ratio": 2.0}])
def test_hf_and_timm_exports_compute_our_features(kw, tmp_path):
    backbone, x = tiny(**kw), torch.rand(3, 1, 28, 28)
    save_hf(backbone, tmp_path / "hf")
    save_timm(backbone, tmp_path / "timm")
    torch.testing.assert_close(hf_features(tmp_path / "hf", x), ours(backbone, x), atol=1e-4, rtol=0)
    torch.testing.assert_close(timm_features(tmp_path / "timm", x), ours(backbone, x), atol=1e-4, rtol=0)


def test_hf_config_states_what_hf_defaults_get_wrong():
    config = hf_config(tiny(mlp_ratio=3.0, qkv_bias=False))
    assert config["layer_norm_eps"] == 1e-6 and config["hidden_act"] == "gelu" and config["qkv_bias"] is False
    assert config["intermediate_size"] == 96 and config["num_channels"] == 1 and config["image_size"] == 28
    keys = hf_state_dict(tiny())
    assert "encoder.layer.1.attention.attention.query.weight" in keys  # transformers 4 names
    assert keys["encoder.layer.0.attention.attention.key.weight"].shape == (32, 32)


def test_unsupported_architectures_are_refused(tmp_path):
    with pytest.raises(ValueError, match="LayerScale"):
        save_hf(tiny(init_values=0.1), tmp_path / "a")
    with pytest.raises(ValueError, match="fc_norm"):
        save_timm(tiny(global_pool="avg"), tmp_path / "b")
    with pytest.raises(TypeError, match="vitssl_core.ViT"):
        save_hf(torch.nn.Linear(2, 2), tmp_path / "c")


def test_mae_export_matches_vit_mae_for_pretraining_with_a_fixed_noise(tmp_path):
    torch.manual_seed(0)
    mae = MAE(tiny(), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2).eval()
    save_hf(mae.backbone, tmp_path, mae=mae)
    x, noise = torch.rand(2, 1, 28, 28), torch.rand(2, 16)
    model, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "mae", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        theirs = model.eval()(x, noise=noise)
        loss, pred, mask = mae(x, noise=noise)
    assert torch.equal(theirs.mask, mask)
    torch.testing.assert_close(theirs.logits, pred, atol=1e-4, rtol=0)
    torch.testing.assert_close(theirs.loss, loss, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- shipped cards and the CLI
@pytest.mark.parametrize("fmt", ["hf", "timm"])
def test_cli_exports_dinos_dynamic_size_card_at_its_own_size(fmt, tmp_path, capsys):
    card_path = resolve_checkpoint("dino")
    backbone, card = load_pretrained(card_path)
    assert card["model"]["dynamic_img_size"]  # the case the issue names
    out = tmp_path / "dino"
    assert cli.main(["export", "dino", "--format", fmt, "--out", str(out)]) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert (config["image_size"] if fmt == "hf" else config["model_args"]["img_size"]) == 28
    readme = (out / "README.md").read_text()
    assert "bicubic" in readme and str(card["normalize"]["mean"]) in readme
    x = (torch.rand(4, 1, 28, 28) - 0.286) / 0.353
    theirs = hf_features(out, x) if fmt == "hf" else timm_features(out, x)
    torch.testing.assert_close(theirs, ours(backbone, x), atol=1e-4, rtol=0)


def test_cli_exports_the_shipped_mae_with_its_decoder(tmp_path, capsys):
    mae, _ = load_mae("mae")
    assert cli.main(["export", "mae", "--format", "hf", "--out", str(tmp_path / "mae")]) == 0, capsys.readouterr().err
    x, noise = torch.rand(2, 1, 28, 28), torch.rand(2, 16)
    torch.testing.assert_close(hf_features(tmp_path / "mae", x), ours(mae.backbone, x), atol=1e-4, rtol=0)
    model = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "mae" / "mae").eval()
    with torch.no_grad():
        theirs, (_, pred, mask) = model(x, noise=noise), mae(x, noise=noise)
    assert torch.equal(theirs.mask, mask)
    torch.testing.assert_close(theirs.logits, pred, atol=1e-4, rtol=0)


def test_cli_exports_a_pretrain_out_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    backbone = vit_mini_28().eval()
    save_backbone(backbone, run / "backbone.safetensors")
    (run / "backbone.json").write_text(json.dumps({"architecture": architecture(backbone)}))
    assert cli.main(["export", str(run), "--format", "timm", "--out", str(tmp_path / "t")]) == 0
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(timm_features(tmp_path / "t", x), ours(backbone, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", "nope", "--format", "hf", "--out", "{tmp}/a"], "not a shipped backbone"),
        (["export", "dino", "--format", "onnx", "--out", "{tmp}/a"], "invalid choice"),
        (["export", "dino", "--format", "hf"], "--out"),
        (["export", "dino", "--format", "hf", "--out", "{tmp}/full"], "not an empty folder"),
        (["export", "{tmp}/nothing.json", "--format", "hf", "--out", "{tmp}/a"], "no such file or folder"),
    ],
)
def test_bad_export_arguments_exit_2_with_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
