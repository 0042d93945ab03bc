"""Tests for the distributed path of vitssl_core.train: torchrun, gloo, DDP.

A real ``torchrun --nproc_per_node=2`` runs ``vitssl pretrain --method simclr``-like training on
this CPU (gloo): augmented views, 2 micro-batches of 4 per process and step (gradient
accumulation), SimCLR's negatives gathered from both ranks, a non-zero learning rate from step 1.
The weights must match one process that takes the combined batch (see ``PerRankBNSimCLR``).
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
from torch.utils.data import Dataset

from helpers import model_args
from vitssl_core import __main__ as cli
from vitssl_core.augment import simclr_augment
from vitssl_core.checkpoint import latest_checkpoint
from vitssl_core.contrastive import MoCoV3, SimCLR
from vitssl_core.dino import DINO
from vitssl_core.losses import info_nce
from vitssl_core.runtime import DistInfo, setup_distributed, sync_batchnorm
from vitssl_core.vit import ViT

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = model_args()


# --------------------------------------------------------------------------- SimCLR on 2 ranks = 1 process
class SeededViews(Dataset):
    """SimCLR's two per-sample views (``augment.simclr_augment``), each sample's randomness drawn
    from torch's generator seeded by its index. The real recipe draws from each process's own
    stream, which no single process can replay; seeded by index, the two ranks and the one process
    see the same pixels for the same sample, whichever process loads it and in whatever order."""

    def __init__(self, dataset: Dataset, transform, seed: int = 0):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        with torch.random.fork_rng(devices=[]):  # leaves the trainer's own stream untouched
            torch.manual_seed(self.seed * 1_000_003 + index)
            return [self.transform(image), self.transform(image)], label


def seeded_simclr_data(dataset, info, method):
    return SeededViews(dataset, simclr_augment(info.img_size, info.grayscale, mean=info.mean, std=info.std))


def without_null_directions(cls):
    """Build ``cls`` with the final norm's bias frozen. Its gradient is zero in exact arithmetic (a
    shift shared by every feature passes the bias-free linear layer as a shift that BatchNorm then
    removes), so what it gets is rounding noise of about 1e-10, which Adam's first steps turn into
    moves of +-lr whose signs depend on the order of the sums. (The ViT here has no qkv bias for
    the same reason: softmax ignores a key bias shared by all keys.)"""

    def build(backbone, **kw):
        method = cls(backbone, **kw)
        method.backbone.norm.bias.requires_grad_(False)
        return method

    return build


class PerRankBNSimCLR(SimCLR):
    """SimCLR in one process, computed as two gloo ranks compute it.

    With ``world`` ranks, DistributedSampler gives rank r the samples r, r + world, ... of the
    shuffled order, so a combined micro-batch ``x`` holds rank r's micro-batch at ``x[r::world]``.
    Each rank runs the projection head on its own samples: on CPUs BatchNorm stays per process
    (``runtime.sync_batchnorm``), so its batch statistics are per rank, and only rank 0's running
    statistics reach the checkpoint (DDP broadcasts rank 0's buffers). The loss is NT-Xent over the
    projections of every rank, which is what ``info_nce``'s gather computes on each rank, averaged.
    """

    def __init__(self, backbone, world: int = 2, **kw):
        super().__init__(backbone, **kw)
        self.world = world

    def training_step(self, batch):
        (x1, x2), _ = batch
        bns = [m for m in self.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        z1, z2 = [], []
        for r in range(self.world):
            a, b = x1[r :: self.world], x2[r :: self.world]
            kept = [{k: v.clone() for k, v in m.named_buffers()} for m in bns] if r else None
            z = self.project(torch.cat([a, b]))  # (2 B_r, proj_dim), BatchNorm over this rank's views
            if kept:  # rank r > 0 updates its own running statistics, which are never saved
                for m, buffers in zip(bns, kept):
                    m._buffers.update(buffers)  # swapped, not copied in: autograd saved the updated ones
            z1.append(z[: len(a)])
            z2.append(z[len(a) :])
        loss = info_nce(torch.cat(z1), torch.cat(z2), self.temperature)
        return loss, {"loss": float(loss.detach())}


TESTS = Path(__file__).resolve().parent
SCRIPT = textwrap.dedent(f"""
    import sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {str(TESTS)!r})
    from test_distributed import seeded_simclr_data, without_null_directions
    from vitssl_core import __main__ as cli
    from vitssl_core.contrastive import SimCLR
    cli.METHODS["simclr_seeded"] = cli.MethodEntry(build=without_null_directions(SimCLR), data=seeded_simclr_data)
    sys.exit(cli.main(sys.argv[1:]))
""")


# A 2-process MoCo v3 run that records, per rank, what train() made of the method's BatchNorms.
SYNC_BN_SCRIPT = textwrap.dedent("""
    import importlib, json, os, sys
    import torch
    torch.set_num_threads(1)
    from vitssl_core import __main__ as cli
    train = importlib.import_module("vitssl_core.train")  # the module; vitssl_core.train is the function
    real = train.sync_batchnorm
    def spy(module, device):
        out = real(module, device)
        bns = [m for m in out.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        kinds = sorted({type(m).__name__ for m in bns})
        with open(os.path.join(sys.argv[1], "sync_bn_rank" + os.environ["RANK"] + ".json"), "w") as f:
            json.dump({"device": str(device), "kinds": kinds}, f)
        return out
    train.sync_batchnorm = spy
    sys.exit(cli.main(sys.argv[2:]))
""")


def pretrain_args(out, batch_size):
    # 3 steps of 16 images, each 2 micro-batches; no warm-up, so step 1 already moves the weights
    return [
        "pretrain",
        "--method",
        "simclr_seeded",
        "--dataset",
        "fashion_mnist",
        "--subset",
        "64",
        "--steps",
        "3",
        "--batch-size",
        str(batch_size),
        "--accum-steps",
        "2",
        "--lr",
        "0.05",
        "--warmup-steps",
        "0",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--log-every",
        "1",
        "--no-progress",
        "--method-arg",
        "hidden_dim=32",
        "--method-arg",
        "proj_dim=16",
        "--method-arg",
        "temperature=0.2",
        "--model-arg",
        "qkv_bias=false",
        "--out",
        str(out),
        *TINY_ARGS,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def torchrun():
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
    ]


def batchnorms(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def tiny_vit():
    return ViT(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2)


@pytest.mark.parametrize(
    "build",
    [
        lambda: SimCLR(tiny_vit(), proj_dim=8, hidden_dim=16),
        lambda: MoCoV3(tiny_vit(), proj_dim=8, hidden_dim=16),
        lambda: DINO(tiny_vit(), out_dim=16, hidden_dim=16, bottleneck_dim=8, use_bn_in_head=True, n_local_crops=0),
    ],
    ids=["simclr", "mocov3", "dino"],
)
def test_sync_batchnorm_converts_the_heads_for_cuda_only(build):
    # Conversion needs no GPU; running a SyncBatchNorm in a process group does (see runtime.sync_batchnorm).
    method = build()
    plain = batchnorms(method)
    assert plain and all(type(m) is torch.nn.BatchNorm1d for m in plain)
    params, keys = [id(p) for p in method.parameters()], list(method.state_dict())
    assert sync_batchnorm(method, "cpu") is method and batchnorms(method) == plain
    synced = sync_batchnorm(method, torch.device("cuda", 0))
    converted = batchnorms(synced)
    assert len(converted) == len(plain) and all(type(m) is torch.nn.SyncBatchNorm for m in converted)
    assert [m.affine for m in converted] == [m.affine for m in plain]  # the last BN stays affine-free
    # The same Parameter objects (an optimizer built before still holds them) and the same checkpoint keys.
    assert [id(p) for p in synced.parameters()] == params and list(synced.state_dict()) == keys
    assert [p.requires_grad for p in synced.parameters()] == [p.requires_grad for p in build().parameters()]
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        sync_batchnorm("model", "cuda")


def test_two_gloo_processes_train_moco_v3_with_per_process_batchnorm(tmp_path, needs_fashion_mnist):
    # train() hands the method to sync_batchnorm under DDP; on CPUs the heads keep plain BatchNorm
    # (a SyncBatchNorm would raise in forward under gloo) and the run completes.
    script = tmp_path / "vitssl_sync_bn.py"
    script.write_text(SYNC_BN_SCRIPT)
    out = tmp_path / "moco"
    args = [
        "pretrain",
        "--method",
        "mocov3",
        "--dataset",
        "fashion_mnist",
        "--subset",
        "32",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--log-every",
        "1",
        "--no-progress",
        "--method-arg",
        "hidden_dim=16",
        "--method-arg",
        "proj_dim=8",
        "--out",
        str(out),
        *TINY_ARGS,
    ]
    run = subprocess.run(
        torchrun() + [str(script), str(tmp_path), *args],
        env=torchrun_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"sync_bn_rank{rank}.json").read_text())
        assert seen == {"device": "cpu", "kinds": ["BatchNorm1d"]}
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in history)


def test_setup_distributed_is_a_no_op_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert setup_distributed() == DistInfo(rank=0, world_size=1, local_rank=0)
    assert not dist.is_initialized()


def test_two_gloo_processes_match_one_process_with_the_combined_batch(tmp_path, monkeypatch, needs_fashion_mnist):
    script = tmp_path / "vitssl_simclr_seeded.py"
    script.write_text(SCRIPT)
    two = subprocess.run(
        torchrun() + [str(script), *pretrain_args(tmp_path / "two", 4)],
        env=torchrun_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-4000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the same command in this process: one rank, micro-batches of 8 = both ranks' 4
        monkeypatch.setitem(
            cli.METHODS,
            "simclr_seeded",
            cli.MethodEntry(build=without_null_directions(PerRankBNSimCLR), data=seeded_simclr_data),
        )
        assert cli.main(pretrain_args(tmp_path / "one", 8)) == 0
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
    # rank 0 alone wrote the outputs; the global batch is 4 x 2 x 2 = 8 x 2 x 1 = 16, hence one peak lr
    two_cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    one_cfg = json.loads((tmp_path / "one" / "config.json").read_text())
    assert two_cfg["world_size"] == 2 and one_cfg["world_size"] == 1
    assert two_cfg["peak_lr"] == pytest.approx(one_cfg["peak_lr"]) == pytest.approx(0.05 * 16 / 256)
    history = [json.loads(line) for line in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [1, 2, 3]
    assert history[0]["lr"] == pytest.approx(0.05 * 16 / 256)  # step 1 trains at the peak rate
    one_history = [json.loads(line) for line in (tmp_path / "one" / "history.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in history] == pytest.approx([row["loss"] for row in one_history], rel=1e-4)
    assert json.loads((tmp_path / "two" / "backbone.json").read_text())["world_size"] == 2
    exported = load_file(tmp_path / "two" / "backbone.safetensors")
    assert torch.equal(exported["blocks.0.attn.qkv.weight"], two_w["backbone.blocks.0.attn.qkv.weight"])


def test_knn_monitor_runs_on_rank_0_while_the_other_rank_waits(tmp_path, needs_fashion_mnist):
    # 32 images, 8 per process and step, 2 processes: an epoch is 2 steps, and epoch_end meets a barrier
    out = tmp_path / "watched"
    args = ["pretrain", "--method", "simclr", "--subset", "32", "--epochs", "2", "--batch-size", "8"]
    args += ["--precision", "fp32", "--device", "cpu", "--log-every", "1", "--no-progress", "--knn-every", "1"]
    args += ["--method-arg", "hidden_dim=16", "--method-arg", "proj_dim=8", "--out", str(out), *TINY_ARGS]
    run = subprocess.run(
        torchrun() + ["-m", "vitssl_core", *args], env=torchrun_env(), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in rows if "knn_top1" in r] == [(2, 1.0), (4, 2.0)]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_under_torchrun_a_busy_out_stops_every_rank(tmp_path, needs_fashion_mnist):
    """Only rank 0 asks for the --out lock; its refusal must reach rank 1 too, or rank 1 waits forever."""
    from vitssl_core.checkpoint import lock_folder

    out = tmp_path / "busy"
    out.mkdir()
    args = ["pretrain", "--method", "supervised", "--subset", "32", "--steps", "2", "--batch-size", "8"]
    args += ["--precision", "fp32", "--device", "cpu", "--no-progress", "--out", str(out), *TINY_ARGS]
    with lock_folder(out):  # this process holds the folder, as a first run would
        run = subprocess.run(
            torchrun() + ["-m", "vitssl_core", *args], env=torchrun_env(), capture_output=True, text=True, timeout=300
        )
    assert run.returncode != 0
    # one message from each rank; both ranks write to one stderr, so their lines may interleave
    said = run.stderr.count(f"vitssl: error: --out {out} is in use by process {os.getpid()} on ")
    assert said == 2 and run.stderr.count("vitssl: error: ") == 2, run.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # neither rank wrote anything
