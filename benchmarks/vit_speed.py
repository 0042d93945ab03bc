"""Training-step speed of ``vitssl_core.ViT`` against timm's ``VisionTransformer`` (Dosovitskiy et al., 2021).

Both models are built with the same configuration and timm's state dict is loaded into ours
(``strict=True``), so the two compute the same function with the same weights; the script checks
that their logits agree before timing anything. One training step is forward, cross-entropy
against random labels, backward (no optimizer), in fp32 or under
``torch.autocast("cpu", dtype=torch.bfloat16)``.

The two models run in one process and alternate every iteration (ours, timm, timm, ours, ...),
so a burst of load from another process on a shared machine hits both about equally. After the
warm-up iterations, the median of N timed iterations gives images/s. Three ratios, each
ours/timm in speed, so >= 1.0 means ours is at least as fast:

- ``ratio``: of the two median wall-clock images/s;
- ``paired``: median over iterations of t_timm / t_ours for the two steps taken back to back
  (``min..max`` shows how much another process's load moved single pairs);
- ``cpu ratio``: the same paired median on process CPU time, which with one thread does not count
  the time other processes hold the core (contention still moves it a few per cent through caches
  and clocks).

On a loaded machine the three move by about +-5% from run to run; only a gap that persists
across runs and across all three columns means anything.

Default batches are small enough that the whole run takes a few CPU-minutes: ViT-Tiny/4 at 28 px
with 128 images (fp32) and ViT-S/16 at 224 px with 8. bf16 rows default to smaller batches
(8 and 1) because CPUs without AVX512-BF16 or AMX run bf16 matmuls through a slow fallback,
about 10-15x slower than fp32; ``--batch`` sets one batch for every row.

    python benchmarks/vit_speed.py                       # both configs, fp32 and bf16
    python benchmarks/vit_speed.py --configs vit_small --precisions fp32 --iters 10 --threads 1,2
    python benchmarks/vit_speed.py --configs vit_tiny_28 --batch 1 --iters 60   # per-step overheads

On a machine shared with other jobs, one thread per process is usually faster and far less noisy
than two: OpenMP threads wait at barriers while another process holds the other core (on a
2-core box at load 10 we measured two threads 3-10x slower than one).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

import vitssl_core
from vitssl_core import ViT

NUM_CLASSES = 10  # a small head so the loss is a real cross-entropy, as in fine-tuning


@dataclass(frozen=True)
class Config:
    """One architecture: the keyword arguments both libraries accept, our preset and a default batch."""

    preset: Callable[..., ViT]
    kwargs: dict
    batch: int  # fp32
    bf16_batch: int  # smaller: without AVX512-BF16/AMX, CPU bf16 matmuls are ~10x slower than fp32


CONFIGS: dict[str, Config] = {
    "vit_tiny_28": Config(
        vitssl_core.vit_tiny_28,
        {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 192, "depth": 12, "num_heads": 3},
        batch=128,
        bf16_batch=8,
    ),
    "vit_small": Config(
        vitssl_core.vit_small,
        {"img_size": 224, "patch_size": 16, "in_chans": 3, "embed_dim": 384, "depth": 12, "num_heads": 6},
        batch=8,
        bf16_batch=1,
    ),
}
PRECISIONS = ("fp32", "bf16")


def build_pair(name: str) -> tuple[ViT, VisionTransformer]:
    """Our preset and timm's model for config ``name``, with timm's weights copied into ours."""
    cfg = CONFIGS[name]
    theirs = VisionTransformer(num_classes=NUM_CLASSES, global_pool="token", **cfg.kwargs)
    ours = cfg.preset(num_classes=NUM_CLASSES, global_pool="token")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.train(), theirs.train()


def make_batch(model: ViT, batch: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random images (B, C, H, W) and labels (B,) for the model's input size."""
    g = torch.Generator().manual_seed(seed)
    H, W = model.img_size
    x = torch.randn(batch, model.in_chans, H, W, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return x, y


@torch.no_grad()
def max_logit_diff(ours: nn.Module, theirs: nn.Module, x: Tensor) -> float:
    """Largest |ours(x) - timm(x)| over the logits, in eval mode and fp32."""
    ours.eval()
    theirs.eval()
    diff = (ours(x) - theirs(x)).abs().max().item()
    ours.train()
    theirs.train()
    return diff


def train_step(model: nn.Module, x: Tensor, y: Tensor, bf16: bool) -> tuple[float, float]:
    """(wall, process CPU) seconds for one forward + cross-entropy + backward, gradients cleared first."""
    model.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return time.perf_counter() - t0, time.process_time() - c0


@dataclass
class Result:
    """Per-iteration timings of one (config, precision, threads) cell: wall and CPU seconds per step."""

    config: str
    batch: int
    precision: str
    threads: int
    ours_s: list[float]
    timm_s: list[float]
    ours_cpu: list[float]
    timm_cpu: list[float]

    @property
    def ours_ips(self) -> float:
        return self.batch / statistics.median(self.ours_s)

    @property
    def timm_ips(self) -> float:
        return self.batch / statistics.median(self.timm_s)

    @property
    def ratio(self) -> float:
        """ours/timm images per second, from the median wall time of each."""
        return self.ours_ips / self.timm_ips

    @property
    def paired(self) -> list[float]:
        """t_timm / t_ours for the two steps of each iteration (taken back to back)."""
        return [t / o for o, t in zip(self.ours_s, self.timm_s)]

    @property
    def cpu_ratio(self) -> float:
        """Median over iterations of CPU-time timm / ours (with threads > 1 it counts every thread's time)."""
        return statistics.median(t / o for o, t in zip(self.ours_cpu, self.timm_cpu))


def bench(
    ours: nn.Module, theirs: nn.Module, x: Tensor, y: Tensor, bf16: bool, warmup: int, iters: int
) -> dict[str, list[float]]:
    """Interleaved timings: per iteration one step of each model, the order flipped every iteration."""
    out: dict[str, list[float]] = {"ours_s": [], "timm_s": [], "ours_cpu": [], "timm_cpu": []}
    for i in range(warmup + iters):
        first, second = ("ours", "timm") if i % 2 == 0 else ("timm", "ours")
        for who in (first, second):
            wall, cpu = train_step(ours if who == "ours" else theirs, x, y, bf16)
            if i >= warmup:
                out[f"{who}_s"].append(wall)
                out[f"{who}_cpu"].append(cpu)
    return out


def _fmt_rate(v: float) -> str:
    """At least three significant digits and no exponent: 1234, 11.2, 0.0421."""
    digits = max(0, 2 - math.floor(math.log10(v))) if v > 0 else 0
    return f"{v:.{digits}f}"


def format_table(results: list[Result]) -> str:
    """A fixed-width table, one row per (config, precision, threads)."""
    head = ("config", "batch", "prec", "thr", "ours img/s", "timm img/s", "ratio", "paired", "min..max", "cpu ratio")
    rows = [head]
    for r in results:
        p = r.paired
        rows.append(
            (
                r.config,
                str(r.batch),
                r.precision,
                str(r.threads),
                _fmt_rate(r.ours_ips),
                _fmt_rate(r.timm_ips),
                f"{r.ratio:.3f}",
                f"{statistics.median(p):.3f}",
                f"{min(p):.2f}..{max(p):.2f}",
                f"{r.cpu_ratio:.3f}",
            )
        )
    widths = [max(len(row[j]) for row in rows) for j in range(len(head))]
    left = {0, 2}  # text columns left-aligned, numbers right-aligned

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if j in left else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), sep] + [line(r) for r in rows[1:]])


def _csv(kind: Callable[[str], object], allowed: tuple | None = None) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [kind(s.strip()) for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r} is empty; give a comma-separated list")
        if allowed is not None:
            bad = [s for s in items if s not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad} not in {list(allowed)}")
        return items

    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--configs",
        type=_csv(str, tuple(CONFIGS)),
        default=list(CONFIGS),
        help=f"comma-separated subset of {','.join(CONFIGS)} (default: all)",
    )
    p.add_argument(
        "--precisions",
        type=_csv(str, PRECISIONS),
        default=list(PRECISIONS),
        help="comma-separated subset of fp32,bf16 (default: both)",
    )
    p.add_argument(
        "--batch",
        type=_positive_int,
        default=None,
        help="batch size for every config and precision (default fp32/bf16: "
        + ", ".join(f"{k} {c.batch}/{c.bf16_batch}" for k, c in CONFIGS.items())
        + ")",
    )
    p.add_argument("--iters", type=_positive_int, default=5, help="timed iterations per model (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per model first (default 1)")
    p.add_argument(
        "--threads",
        type=_csv(_positive_int),
        default=[1],
        help="comma-separated torch thread counts to try, e.g. 1,2 (default 1)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="vit_tiny_28 only, fp32, batch 4, one timed iteration: a smoke test in seconds",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.precisions, args.batch, args.iters, args.warmup = ["vit_tiny_28"], ["fp32"], 4, 1, 0
    if args.warmup < 0:
        p.error(f"--warmup={args.warmup} must be >= 0")
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}  timm {timm.__version__}  vitssl_core {vitssl_core.__version__}  "
        f"python {platform.python_version()}  cpu {torch.backends.cpu.get_cpu_capability()}  "
        f"cores {os.cpu_count()}  load(1min) {load:.1f}"
    )
    print(
        f"step = forward + cross-entropy + backward; warm-up {args.warmup}, median of {args.iters}, "
        "ours/timm interleaved\n"
    )
    start = time.perf_counter()
    results = []
    for name in args.configs:
        cfg = CONFIGS[name]
        ours, theirs = build_pair(name)
        diff = max_logit_diff(ours, theirs, make_batch(ours, 4)[0])
        if diff > 1e-4:
            sys.exit(f"{name}: ours and timm disagree (max |logit diff| {diff:.2e}); the comparison is meaningless")
        print(f"{name}: weights loaded from timm, max |logit diff| {diff:.1e}", flush=True)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for precision in args.precisions:
                batch = args.batch or (cfg.bf16_batch if precision == "bf16" else cfg.batch)
                x, y = make_batch(ours, batch)
                times = bench(ours, theirs, x, y, precision == "bf16", args.warmup, args.iters)
                results.append(Result(name, batch, precision, threads, **times))
                r = results[-1]
                print(
                    f"  {precision} threads={threads}: ours {_fmt_rate(r.ours_ips)} img/s, "
                    f"timm {_fmt_rate(r.timm_ips)} img/s, "
                    f"ratio {r.ratio:.3f}, cpu ratio {r.cpu_ratio:.3f}",
                    flush=True,
                )
    print()
    print(format_table(results))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
