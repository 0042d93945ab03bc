"""Tests for vitssl_core.checkpoint: atomic files, crash consistency, safe loading, backbone export.

The headline test kills a real `vitssl pretrain` run of every method with SIGKILL after its
checkpoint at step k, resumes it with --resume, and checks that the weights equal (bit for bit)
those of a run that never stopped.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY, model_args
from vitssl_core import ViT
from vitssl_core.__main__ import main as cli_main
from vitssl_core.checkpoint import (
    UnsafeCheckpointError,
    atomic_write_bytes,
    latest_checkpoint,
    load_backbone,
    load_checkpoint,
    save_backbone,
    save_checkpoint,
)
from vitssl_core.supervised import Supervised
from vitssl_core.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def tiny_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return Supervised(ViT(**TINY), num_classes=10).state_dict()


# --------------------------------------------------------------------------- atomic files and layout
def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    with pytest.raises(TypeError, match="bytes"):
        atomic_write_bytes(target, "text")


def test_save_load_round_trip_and_pointer(tmp_path):
    root = tmp_path / "checkpoints"
    state = {"step": 2, "rng": [torch.get_rng_state()], "config": {"betas": (0.9, 0.95), "out_dir": None}}
    save_checkpoint(root, 1, tiny_state(1), {**state, "step": 1})
    save_checkpoint(root, 2, tiny_state(2), state)
    assert json.loads((root / "last.json").read_text()) == {"step": 2, "dir": "step_00000002"}
    assert sorted(p.name for p in root.iterdir()) == ["last.json", "step_00000002"]  # older one pruned
    weights, loaded = load_checkpoint(tmp_path)  # the run folder works as well as root
    expected = tiny_state(2)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    assert loaded["step"] == 2 and loaded["config"]["betas"] == (0.9, 0.95)
    assert torch.equal(loaded["rng"][0], state["rng"][0])


def test_a_crash_mid_write_leaves_the_last_committed_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 2, tiny_state(), {"step": 2})
    (root / "step_00000003.tmp").mkdir()  # died while writing step 3 ...
    (root / "step_00000003.tmp" / "model.safetensors").write_bytes(b"half a fi")
    (root / "step_00000004").mkdir()  # ... or after the rename, before last.json
    assert latest_checkpoint(root) == root / "step_00000002"
    assert load_checkpoint(root)[1]["step"] == 2
    save_checkpoint(root, 3, tiny_state(), {"step": 3})  # the next save cleans up, stale step 4 too
    assert sorted(p.name for p in root.iterdir()) == ["last.json", "step_00000003"]
    with pytest.raises(ValueError, match="never overwritten"):
        save_checkpoint(root, 3, tiny_state(1), {"step": 3})
    save_checkpoint(root, 4, tiny_state(), {"step": 4}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["last.json", "step_00000003", "step_00000004"]


def test_missing_checkpoint_and_unreadable_state_are_explained(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        load_checkpoint(tmp_path)
    with pytest.raises(TypeError, match="weights_only"):
        save_checkpoint(tmp_path, 1, tiny_state(), {"step": 1, "odd": object()})
    assert latest_checkpoint(tmp_path) is None  # nothing was written


class Payload:
    """Unpickling this runs ``touch <marker>``: the classic malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    save_checkpoint(root, 1, tiny_state(), {"step": 1})
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"step": 1, "optimizer": Payload(marker)}, buffer)  # plain pickle, as an attacker would
    (root / "step_00000001" / "state.pt").write_bytes(buffer.getvalue())
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*state.pt.*posix.system"):
        load_checkpoint(root)
    data = torch.utils.data.TensorDataset(torch.rand(32, 1, 28, 28), torch.zeros(32, dtype=torch.long))
    config = TrainConfig(max_steps=2, batch_size=16, out_dir=str(tmp_path / "run"), resume=True, progress=False)
    with pytest.raises(UnsafeCheckpointError):  # resuming refuses it too
        train(Supervised(ViT(**TINY), num_classes=10), data, config)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage", "empty", "json"])
def test_a_corrupt_state_is_told_apart_from_one_that_would_run_code(tmp_path, damage):
    step_dir = save_checkpoint(tmp_path, 1, tiny_state(), {"step": 1, "t": torch.zeros(3)})
    good = (step_dir / "state.pt").read_bytes()
    (step_dir / "state.pt").write_bytes(
        {
            "truncated": good[: len(good) // 2],
            "flipped": good[:100] + bytes(200) + good[300:],
            "garbage": b"not a checkpoint" * 8,
            "empty": b"",
            "json": b'{"step": 1}',
        }[damage]
    )
    with pytest.raises(ValueError, match=re.escape(str(step_dir / "state.pt")) + " is corrupt"):
        load_checkpoint(tmp_path)


def test_corrupt_weights_and_cards_name_the_file(tmp_path):
    from vitssl_core.pretrained import load_pretrained
    from vitssl_core.vit import architecture

    step_dir = save_checkpoint(tmp_path / "ck", 1, tiny_state(), {"step": 1})
    (step_dir / "model.safetensors").write_bytes(b"\xff" * 8 + b"junk")
    with pytest.raises(ValueError, match=re.escape(str(step_dir / "model.safetensors")) + " is not a readable"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "b.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "b.safetensors")) + " is not a readable"):
        load_backbone(tmp_path / "b.safetensors")
    backbone = ViT(**TINY)
    save_backbone(backbone, tmp_path / "tiny.safetensors")
    for text, message in (
        ('{"model": ', "tiny.json is not valid JSON"),
        (json.dumps({"model": {**architecture(backbone), "bogus": 1}}), "do not build a ViT"),
        (
            json.dumps({"model": {**architecture(backbone), "depth": 1}}),
            "tiny.safetensors does not fit the ViT its card tiny.json describes: Unexpected key",
        ),
    ):
        (tmp_path / "tiny.json").write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            load_pretrained(tmp_path / "tiny.json")
        assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["mocov3", "dino"])
def test_the_logged_momentum_survives_a_checkpoint_and_old_checkpoints_still_load(name):
    from vitssl_core.contrastive import MoCoV3
    from vitssl_core.dino import DINO

    def build():
        torch.manual_seed(0)
        vit = ViT(**TINY)
        return (
            MoCoV3(vit, proj_dim=8, hidden_dim=16, momentum=0.9)
            if name == "mocov3"
            else DINO(vit, out_dim=16, hidden_dim=16, bottleneck_dim=8, n_local_crops=0, momentum=0.9)
        )

    trained = build()
    trained.on_step_end(3, 10)  # the momentum of step 3 of a 10-step cosine
    assert trained.momentum > 0.9
    resumed = build()
    resumed.load_state_dict(trained.state_dict())
    assert resumed.momentum == trained.momentum
    assert trained.state_dict()["momentum_log.bits"].dtype == torch.int64  # exact, and no float64 for MPS
    before = {k: v for k, v in trained.state_dict().items() if k != "momentum_log.bits"}  # a checkpoint from before
    older = build()
    older.load_state_dict(before)  # strict: the missing buffer keeps its base value
    assert older.momentum == 0.9
    float64_era = dict(before, last_momentum=torch.tensor(trained.momentum, dtype=torch.float64))
    upgraded = build()
    upgraded.load_state_dict(float64_era)  # strict: the older float64 buffer is converted, bit for bit
    assert upgraded.momentum == trained.momentum


# --------------------------------------------------------------------------- backbone export
def test_backbone_export_has_timm_keys_and_loads_into_timm(tmp_path):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    backbone = ViT(**TINY)
    save_backbone(backbone, tmp_path / "b.safetensors")
    state = load_backbone(tmp_path / "b.safetensors")
    assert state.keys() == backbone.state_dict().keys()
    assert "blocks.0.attn.qkv.weight" in state and not any(k.startswith("backbone.") for k in state)
    ours = ViT(**TINY)
    ours.load_state_dict(state, strict=True)
    theirs = timm_vit.VisionTransformer(**TINY, num_classes=0)
    theirs.load_state_dict(state, strict=True)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(theirs.forward_features(x), backbone.forward_features(x))
        torch.testing.assert_close(ours.forward_features(x), backbone.forward_features(x))


def test_backbone_export_in_float16_and_from_a_training_checkpoint(tmp_path):
    backbone = ViT(**TINY)
    save_backbone(backbone, tmp_path / "full.safetensors")
    save_backbone(backbone, tmp_path / "half.safetensors", dtype=torch.float16)
    half = load_backbone(tmp_path / "half.safetensors")
    assert all(v.dtype == torch.float16 for v in half.values())
    assert (tmp_path / "half.safetensors").stat().st_size < 0.6 * (tmp_path / "full.safetensors").stat().st_size
    torch.testing.assert_close(half["pos_embed"].float(), backbone.pos_embed.detach(), atol=1e-3, rtol=1e-3)
    method_state = Supervised(backbone, num_classes=10).state_dict()
    step_dir = save_checkpoint(tmp_path / "ck", 1, method_state, {"step": 1})
    from_ckpt = load_backbone(step_dir / "model.safetensors")  # backbone.* keys, prefix stripped
    assert from_ckpt.keys() == backbone.state_dict().keys()
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        save_backbone(backbone, tmp_path / "x.safetensors", dtype=torch.int8)
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_backbone(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------- SIGKILL, then resume
# `vitssl pretrain` in a subprocess, with one change: its training callback sleeps once the step
# after the first checkpoint is logged, so the SIGKILL lands between two checkpoints.
VICTIM = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    from vitssl_core import __main__ as cli

    k, argv, train = int(sys.argv[1]), sys.argv[2:], cli.train
    def chain(callback):  # the CLI's own callback (it writes run.json) runs first
        return lambda row: (callback and callback(row), time.sleep(600) if row["step"] > k else None)

    cli.train = lambda *args, callback=None, **kw: train(*args, **kw, callback=chain(callback))
    sys.exit(cli.main(argv))
""")
RESUME_TINY = model_args(depth=1, drop_path_rate=0.1)
RESUME_METHODS = {  # method -> --method-arg pairs that keep its heads tiny
    "supervised": {},
    "simclr": {"hidden_dim": 32, "proj_dim": 16},
    "mocov3": {"hidden_dim": 32, "proj_dim": 16},
    # The last layer is frozen for 6 steps: the checkpoint (4) and the kill (5) come before, the end (8) after.
    "dino": {"n_local_crops": 2, "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "freeze_last_layer_steps": 6},
    "mae": {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
    "simmim": {},
    "beit": {"vocab_size": 16, "tokenizer_images": 64},
}


@pytest.mark.parametrize("method", list(RESUME_METHODS))
def test_sigkill_then_resume_gives_bit_identical_weights(method, tmp_path, capsys, needs_fashion_mnist):
    """2k steps straight == k steps, SIGKILL after step k + 1, --resume for the rest (CPU, fp32, num_workers 0).

    A real `vitssl pretrain`: the method's own data recipe or batch views, drop-path, warm-up,
    gradient clipping and a weight-decay cosine; 40 images in batches of 8 make 5 steps per
    epoch, so the resumed run (from step k = 4) crosses an epoch boundary.
    """
    k = 4
    argv = lambda out, *extra: [  # noqa: E731
        "pretrain",
        "--method",
        method,
        "--steps",
        str(2 * k),
        "--subset",
        "40",
        "--batch-size",
        "8",
        "--lr",
        "2e-3",
        "--warmup-steps",
        "2",
        "--weight-decay-end",
        "0.2",
        "--grad-clip",
        "1.0",
        "--precision",
        "fp32",
        "--num-workers",
        "0",
        "--seed",
        "1",
        "--checkpoint-every",
        str(k),
        "--log-every",
        "1",
        "--no-progress",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / out),
        *RESUME_TINY,
        *[w for key, value in RESUME_METHODS[method].items() for w in ("--method-arg", f"{key}={value}")],
        *extra,
    ]
    script = tmp_path / "victim.py"
    script.write_text(VICTIM)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    victim = subprocess.Popen(
        [sys.executable, str(script), str(k), *argv("run")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference runs here while the victim starts: one core each
    try:
        assert cli_main(argv("ref")) == 0, capsys.readouterr().err
        pointer, history = tmp_path / "run" / "checkpoints" / "last.json", tmp_path / "run" / "history.jsonl"
        deadline = time.monotonic() + 120
        while not (pointer.is_file() and history.is_file() and len(history.read_text().splitlines()) == k + 1):
            assert victim.poll() is None, f"the run ended before it was killed:\n{victim.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint at step k and row k + 1 within 120 s"
            time.sleep(0.02)
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate()
        assert victim.returncode == -signal.SIGKILL
        assert json.loads(pointer.read_text())["step"] == k  # killed after step k + 1, before the next checkpoint
        assert cli_main(argv("run", "--resume")) == 0, capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
        if victim.poll() is None:
            victim.kill()
            victim.communicate()

    def final(out):
        step_dir = latest_checkpoint(tmp_path / out)
        assert step_dir.name == f"step_{2 * k:08d}"
        return load_file(step_dir / "model.safetensors")

    ref_w, run_w = final("ref"), final("run")
    assert ref_w.keys() == run_w.keys()
    assert [name for name in ref_w if not torch.equal(ref_w[name], run_w[name])] == []

    def backbone(out: str) -> bytes:
        return (tmp_path / out / "backbone.safetensors").read_bytes()

    assert backbone("ref") == backbone("run")

    def drop(text: str) -> list[dict]:  # history rows without the wall-clock fields
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("img_per_s", "wall_s")}
            for line in text.splitlines()
        ]

    ref_rows = drop((tmp_path / "ref" / "history.jsonl").read_text())
    run_rows = drop((tmp_path / "run" / "history.jsonl").read_text())
    assert [r["step"] for r in run_rows] == list(range(1, 2 * k + 1))  # the row after the checkpoint re-done once
    assert run_rows == ref_rows


def test_load_pretrained_reads_a_card_and_float16_weights(tmp_path):
    from vitssl_core.pretrained import load_pretrained
    from vitssl_core.vit import architecture

    backbone = ViT(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2).eval()
    save_backbone(backbone, tmp_path / "tiny.safetensors", dtype=torch.float16)
    card = {"name": "tiny", "weights": "tiny.safetensors", "model": architecture(backbone), "feature": "cls"}
    (tmp_path / "tiny.json").write_text(json.dumps(card))
    for path in (tmp_path / "tiny.json", tmp_path / "tiny.safetensors"):
        loaded, loaded_card = load_pretrained(path)
        assert loaded_card == card and not loaded.training
        assert all(p.dtype == torch.float32 for p in loaded.parameters())
        x = torch.rand(3, 1, 28, 28)
        with torch.no_grad():  # float16 storage: equal to the original up to half precision
            torch.testing.assert_close(loaded(x), backbone.half().float()(x), atol=1e-5, rtol=1e-5)
        backbone.float()


def test_load_pretrained_explains_what_is_missing(tmp_path):
    from vitssl_core.pretrained import load_pretrained

    with pytest.raises(FileNotFoundError, match="no card missing.json"):
        load_pretrained(tmp_path / "missing.safetensors")
    (tmp_path / "nomodel.json").write_text(json.dumps({"weights": "nomodel.safetensors"}))
    with pytest.raises(ValueError, match='no "model" mapping'):
        load_pretrained(tmp_path / "nomodel.json")
    (tmp_path / "pixels.json").write_text(json.dumps({"weights": None, "model": {"depth": 1}}))
    with pytest.raises(FileNotFoundError, match="pixels.safetensors are missing"):
        load_pretrained(tmp_path / "pixels.json")


def test_load_pretrained_reads_the_card_vitssl_pretrain_writes(tmp_path):
    from vitssl_core.pretrained import load_pretrained
    from vitssl_core.vit import architecture

    backbone = ViT(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2).eval()
    save_backbone(backbone, tmp_path / "backbone.safetensors")
    card = {"weights": "backbone.safetensors", "architecture": architecture(backbone), "model": "vit_mini_28"}
    (tmp_path / "backbone.json").write_text(json.dumps(card))
    loaded, loaded_card = load_pretrained(tmp_path / "backbone.json")
    assert loaded_card == card
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in loaded.state_dict().items())
