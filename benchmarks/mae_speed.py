"""MAE pre-training step speed: vitssl_core.MAE against Hugging Face transformers' ViTMAEForPreTraining.

One process, same configuration (a ViT-Tiny-like encoder and the same decoder), same mask ratio,
same precision; steps (forward + backward + AdamW) of the two models are interleaved so that
machine load hits both alike, and the median over rounds is reported. Then our step time at
mask ratios 0.5, 0.75 and 0.9: MAE's encoder only sees the visible patches, so it should fall.
On a CPU, ``--ceiling`` profiles both steps and splits their time into matrix products (GEMMs),
fused attention, GELU and everything else, with the largest ratio over HF that our step could
reach if everything else cost nothing (both compute the same products, so the GEMM share bounds it).

    pip install transformers   # for this benchmark only; vitssl_core does not need it
    python benchmarks/mae_speed.py                       # 28x28 grey, patch 4 (Fashion-MNIST)
    python benchmarks/mae_speed.py --img-size 32 --in-chans 3 --batch-size 128 --device cuda
    python benchmarks/mae_speed.py --threads 1 --skip-bf16 --ceiling   # where the CPU time goes
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from vitssl_core.mae import MAE
from vitssl_core.vit import ViT


def build_ours(a, mask_ratio: float) -> MAE:
    enc = ViT(
        img_size=a.img_size,
        patch_size=a.patch_size,
        in_chans=a.in_chans,
        embed_dim=a.embed_dim,
        depth=a.depth,
        num_heads=a.num_heads,
        pos_embed="sincos",
    )
    return MAE(
        enc,
        decoder_embed_dim=a.dec_dim,
        decoder_depth=a.dec_depth,
        decoder_num_heads=a.dec_heads,
        mask_ratio=mask_ratio,
        norm_pix_loss=True,
    )


def build_hf(a, mask_ratio: float):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(
        hidden_size=a.embed_dim,
        num_hidden_layers=a.depth,
        num_attention_heads=a.num_heads,
        intermediate_size=4 * a.embed_dim,
        image_size=a.img_size,
        patch_size=a.patch_size,
        num_channels=a.in_chans,
        decoder_hidden_size=a.dec_dim,
        decoder_num_hidden_layers=a.dec_depth,
        decoder_num_attention_heads=a.dec_heads,
        decoder_intermediate_size=4 * a.dec_dim,
        mask_ratio=mask_ratio,
        norm_pix_loss=True,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    try:
        return ViTMAEForPreTraining._from_config(cfg, attn_implementation="sdpa")  # fused attention, like ours
    except (TypeError, ValueError, AttributeError):
        return ViTMAEForPreTraining(cfg)


def make_step(model, loss_fn, x, device, amp: bool):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-4, weight_decay=0.05)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else nullcontext()

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = loss_fn(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step


def ours_loss(model, x):
    return model(x)[0]


def hf_loss(model, x):
    return model(pixel_values=x).loss


def compare(a, device, amp: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(a.batch_size, a.in_chans, a.img_size, a.img_size, device=device)
    ours, hf = build_ours(a, a.mask_ratio).to(device).train(), build_hf(a, a.mask_ratio).to(device).train()
    steps = {"ours": make_step(ours, ours_loss, x, device, amp), "hf": make_step(hf, hf_loss, x, device, amp)}
    for _ in range(a.warmup):
        for s in steps.values():
            s()
    times = {"ours": [], "hf": []}
    for r in range(a.rounds):
        order = ("ours", "hf") if r % 2 == 0 else ("hf", "ours")  # alternate who goes first
        for name in order:
            times[name].append(steps[name]())
    med = {k: statistics.median(v) for k, v in times.items()}
    label = "bf16 autocast" if amp else "fp32"
    print(
        f"[{label}] ours {a.batch_size / med['ours']:8.1f} img/s ({1e3 * med['ours']:7.1f} ms/step)   "
        f"HF ViTMAEForPreTraining {a.batch_size / med['hf']:8.1f} img/s ({1e3 * med['hf']:7.1f} ms/step)   "
        f"ratio {med['hf'] / med['ours']:.2f}x"
    )


def scaling(a, device) -> None:
    torch.manual_seed(0)
    x = torch.randn(a.batch_size, a.in_chans, a.img_size, a.img_size, device=device)
    models = {r: build_ours(a, r).to(device).train() for r in (0.5, 0.75, 0.9)}
    steps = {r: make_step(m, ours_loss, x, device, False) for r, m in models.items()}
    for _ in range(a.warmup):
        for s in steps.values():
            s()
    times = {r: [] for r in steps}
    for _ in range(a.rounds):
        for r, s in steps.items():
            times[r].append(s())
    base = statistics.median(times[0.75])
    L = (a.img_size // a.patch_size) ** 2
    for r, t in times.items():
        med = statistics.median(t)
        print(
            f"[fp32] mask ratio {r:4.2f}: encoder sees 1+{int(L * (1 - r)):3d} of 1+{L} tokens, "
            f"{1e3 * med:7.1f} ms/step, {a.batch_size / med:8.1f} img/s, {med / base:.2f}x the 0.75 step time"
        )


KINDS = {  # profiler op names -> the part of the step they belong to
    "GEMM": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
    "GELU": ("aten::gelu", "aten::gelu_backward"),
}


def ceiling(a, device) -> None:
    """Per model: the share of a step's self CPU time per KIND, and the bound it puts on our speed-up."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    x = torch.randn(a.batch_size, a.in_chans, a.img_size, a.img_size, device=device)
    seconds = {}
    for name, model, loss_fn in (
        ("ours", build_ours(a, a.mask_ratio), ours_loss),
        ("HF", build_hf(a, a.mask_ratio), hf_loss),
    ):
        step = make_step(model.to(device).train(), loss_fn, x, device, False)
        for _ in range(a.warmup):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.rounds):
                step()
        self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        total = sum(self_us.values())
        parts = {kind: sum(self_us.get(op, 0.0) for op in ops) for kind, ops in KINDS.items()}
        parts["everything else"] = total - sum(parts.values())
        seconds[name] = parts
        print(f"[fp32 profile] {name:4s} " + "   ".join(f"{k} {100 * v / total:4.1f} %" for k, v in parts.items()))
    hf_total = sum(seconds["HF"].values())
    ours_floor = sum(v for k, v in seconds["ours"].items() if k != "everything else")
    print(
        f"[fp32 profile] GEMM time ours/HF {seconds['ours']['GEMM'] / seconds['HF']['GEMM']:.2f}; "
        f"if everything but GEMMs, attention and GELU cost nothing, ours would be "
        f"{hf_total / ours_floor:.2f}x HF at most"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--embed-dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--dec-dim", type=int, default=128)
    p.add_argument("--dec-depth", type=int, default=4)
    p.add_argument("--dec-heads", type=int, default=4)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--skip-bf16", action="store_true")
    p.add_argument("--ceiling", action="store_true", help="CPU only: profile where each step's time goes")
    p.add_argument("--quick", action="store_true", help="tiny models, one round: a smoke test in seconds")
    a = p.parse_args(argv)
    if a.quick:
        a.embed_dim, a.depth, a.num_heads, a.dec_dim, a.dec_depth, a.dec_heads = 32, 1, 2, 32, 1, 2
        a.batch_size, a.warmup, a.rounds = 4, 0, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}, "
        f"threads {torch.get_num_threads()}"
    )
    ours, hf = build_ours(a, a.mask_ratio), build_hf(a, a.mask_ratio)

    def n(m):
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    print(
        f"encoder D={a.embed_dim} depth={a.depth} heads={a.num_heads}, decoder D={a.dec_dim} "
        f"depth={a.dec_depth} heads={a.dec_heads}, {a.img_size}x{a.img_size}x{a.in_chans} patch {a.patch_size}, "
        f"batch {a.batch_size}, mask ratio {a.mask_ratio}; trainable params ours {n(ours):,} HF {n(hf):,}"
    )
    del ours, hf
    compare(a, device, amp=False)
    if not a.skip_bf16:
        compare(a, device, amp=True)
    scaling(a, device)
    if (a.ceiling or a.quick) and device.type == "cpu":  # --quick smoke-tests every part
        ceiling(a, device)


if __name__ == "__main__":
    main()
