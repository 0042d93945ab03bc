"""Where a training step's time goes, for every method the ``vitssl`` command trains.

For each method the benchmark builds exactly what ``vitssl pretrain --method M`` builds (the
CLI's ``METHODS`` table: backbone preset, method, data recipe, batched views), then times the
parts of a real step on Fashion-MNIST, one after another, with AdamW:

- data: fetching and collating the batch from the DataLoader (per-image transforms included);
- views: the batched augmentation on the training device (multi-view methods);
- forward, backward: the method's ``training_step`` and ``loss.backward()``;
- update: the optimizer step and ``on_step_end`` (EMA of teacher or momentum encoder).

It prints images/s, the median time of each part, and the share of the step outside the
model's forward and backward. ``--compare-per-image`` adds, for the multi-view methods, the
same step with the per-image torchvision pipelines of ``vitssl_core.augment`` (what the CLI
used before); ``--compile`` adds the step with ``torch.compile`` on the method. Numbers are
ratios on a shared machine: compare rows of one run, not runs of different days.

    python benchmarks/method_speed.py                       # all methods, every core, fp32
    python benchmarks/method_speed.py --methods simclr dino --compare-per-image --compile
    python benchmarks/method_speed.py --threads 1 --precision bf16 --steps 6
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, Subset

from vitssl_core import data, vit
from vitssl_core.augment import MultiCrop, TwoViews, asymmetric_augment, dino_augment, simclr_augment
from vitssl_core.optim import param_groups
from vitssl_core.recipes import METHODS, DataInfo, dino_local_size

PARTS = ("data", "views", "forward", "backward", "update")
# --quick: a smoke test of every code path in seconds, not a measurement.
QUICK_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}
QUICK_METHOD_ARGS = {
    "simclr": {"hidden_dim": 32},
    "mocov3": {"hidden_dim": 32},
    "dino": {"out_dim": 64, "hidden_dim": 32, "n_local_crops": 2},
    "mae": {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
    "beit": {"vocab_size": 16, "tokenizer_images": 64},
}


def _per_image_dataset(name: str, base, info: DataInfo, method):
    """The per-image pipeline of augment.py for a multi-view method (the pre-batched CLI recipe)."""
    kw = dict(mean=info.mean, std=info.std)
    if name == "simclr":
        return TwoViews(base, simclr_augment(info.img_size, info.grayscale, **kw))
    if name == "mocov3":
        return TwoViews(base, *asymmetric_augment(info.img_size, info.grayscale, **kw))
    local = dino_local_size(info.img_size, method.backbone.patch_size)
    return MultiCrop(base, *dino_augment(info.img_size, local, info.grayscale, **kw), n_local=method.n_local_crops)


def time_method(name: str, base, info: DataInfo, args, per_image: bool = False, compiled: bool = False) -> dict:
    """Median seconds of each part of a step, and images/s, for one method."""
    torch.manual_seed(0)
    entry = METHODS[name]
    backbone = vit.vit_mini_28(**(QUICK_VIT if args.quick else {}))
    kwargs = {"num_classes": info.num_classes} if entry.num_classes else {}
    if args.quick:
        kwargs.update(QUICK_METHOD_ARGS.get(name, {}))
    if entry.needs_dataset:
        kwargs["dataset"] = base
    if entry.needs_steps:  # DINO's epoch-long schedules, for a run of 100 epochs
        kwargs["epoch_steps"] = len(base) // args.batch_size
        kwargs["total_steps"] = 100 * kwargs["epoch_steps"]
    method = entry.build(backbone, **kwargs)
    views = None
    if per_image and entry.views is not None:
        dataset = _per_image_dataset(name, base, info, method)
    else:
        dataset = entry.data(base, info, method) if entry.data is not None else base
        views = entry.views(info, method) if entry.views is not None else None
    method.train()
    optimizer = torch.optim.AdamW(param_groups(method, 0.05), lr=1e-4, fused=True)  # as train() builds it
    step_fn = torch.compile(method.training_step) if compiled else method.training_step
    loader = iter(DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True))
    bf16 = args.precision == "bf16"
    times = {part: [] for part in PARTS}
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        if views is not None:
            with torch.no_grad():
                batch = views(batch)
        t2 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = step_fn(batch)
        t3 = time.perf_counter()
        loss.float().backward()
        t4 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if callable(getattr(method, "on_step_end", None)):
            method.on_step_end(i, args.warmup + args.steps)
        t5 = time.perf_counter()
        if i >= args.warmup:
            for part, dt in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                times[part].append(dt)
    median = {part: statistics.median(v) for part, v in times.items()}
    step = sum(median.values())
    return {
        **median,
        "step": step,
        "img_per_s": args.batch_size / step,
        "outside": (median["data"] + median["views"] + median["update"]) / step,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--compare-per-image", action="store_true", help="also time the per-image view pipelines")
    parser.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    parser.add_argument("--quick", action="store_true", help="a tiny ViT, small heads, one step: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.warmup = 8, 1, 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    base = data.FashionMNIST(train=True)
    if args.quick:
        base = Subset(base, range(64))
    stats = data.NORMALIZE["fashion_mnist"]
    info = DataInfo("fashion_mnist", 28, 1, tuple(stats["mean"]), tuple(stats["std"]), 10)
    print(
        f"vit_mini_28, batch {args.batch_size}, {args.precision}, {torch.get_num_threads()} thread(s), "
        f"median of {args.steps} steps (ms)"
    )
    header = f"{'method':<22}{'img/s':>7}" + "".join(f"{p:>9}" for p in PARTS) + f"{'outside':>9}"
    print(header)
    for name in args.methods:
        variants = [("", False, False)]
        if args.compare_per_image and METHODS[name].views is not None:
            variants.append((" per-image", True, False))
        if args.compile:
            variants.append((" compiled", False, True))
        for suffix, per_image, compiled in variants:
            r = time_method(name, base, info, args, per_image=per_image, compiled=compiled)
            print(
                f"{name + suffix:<22}{r['img_per_s']:>7.0f}"
                + "".join(f"{1000 * r[p]:>9.1f}" for p in PARTS)
                + f"{100 * r['outside']:>8.0f}%",
                flush=True,
            )


if __name__ == "__main__":
    main()
