"""Tests for the distributed path of vitssl_core.train: torchrun, gloo, DDP.

A real ``torchrun --nproc_per_node=2`` runs ``vitssl pretrain`` on this CPU (gloo); each process
takes a batch of 8 and the result must match one process taking the combined batch of 16.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from vitssl_core import __main__ as cli
from vitssl_core.checkpoint import latest_checkpoint
from vitssl_core.train import DistInfo, setup_distributed

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--model-arg", "depth=2", "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2",
             "--model-arg", "patch_size=7"]

# The supervised recipe augments with per-process random crops, which no single process can
# reproduce; this entry trains on the plain images so the two runs see the same pixels.
SCRIPT = textwrap.dedent('''
    import sys
    import torch
    torch.set_num_threads(1)
    from vitssl_core import __main__ as cli
    from vitssl_core.supervised import Supervised
    cli.METHODS["plain"] = cli.MethodEntry(build=Supervised, data=lambda ds, info, method: ds, num_classes=True)
    sys.exit(cli.main(sys.argv[1:]))
''')


def pretrain_args(out, batch_size):
    return ["pretrain", "--method", "plain", "--dataset", "fashion_mnist", "--subset", "64", "--steps", "3",
            "--batch-size", str(batch_size), "--lr", "0.05", "--warmup-steps", "1", "--precision", "fp32",
            "--device", "cpu", "--log-every", "1", "--no-progress", "--out", str(out), *TINY_ARGS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_setup_distributed_is_a_no_op_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert setup_distributed() == DistInfo(rank=0, world_size=1, local_rank=0)
    assert not dist.is_initialized()


def test_two_gloo_processes_match_one_process_with_the_combined_batch(tmp_path, monkeypatch):
    script = tmp_path / "vitssl_plain.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    two = subprocess.run(launcher + [str(script), *pretrain_args(tmp_path / "two", 8)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-4000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the same command in this process, one rank, batch 16
        from vitssl_core.supervised import Supervised
        monkeypatch.setitem(cli.METHODS, "plain", cli.MethodEntry(build=Supervised, data=lambda ds, info, method: ds,
                                                                  num_classes=True))
        assert cli.main(pretrain_args(tmp_path / "one", 16)) == 0
    finally:
        torch.set_num_threads(threads)

    def weights(out):
        step_dir = latest_checkpoint(out)
        assert step_dir.name == "step_00000003"
        return load_file(step_dir / "model.safetensors")

    two_w, one_w = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert two_w.keys() == one_w.keys()
    for name, w in one_w.items():
        torch.testing.assert_close(two_w[name], w, atol=1e-5, rtol=1e-4, msg=name)
    # rank 0 alone wrote the outputs; the global batch is 16 in both runs, hence the same peak lr
    two_cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    one_cfg = json.loads((tmp_path / "one" / "config.json").read_text())
    assert two_cfg["world_size"] == 2 and one_cfg["world_size"] == 1
    assert two_cfg["peak_lr"] == pytest.approx(one_cfg["peak_lr"]) == pytest.approx(0.05 * 16 / 256)
    assert json.loads((tmp_path / "two" / "backbone.json").read_text())["world_size"] == 2
    exported = load_file(tmp_path / "two" / "backbone.safetensors")
    assert torch.equal(exported["blocks.0.attn.qkv.weight"], two_w["backbone.blocks.0.attn.qkv.weight"])
    history = [json.loads(line) for line in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [1, 2, 3]
