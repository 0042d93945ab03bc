"""Where bf16 autocast pays on a CPU: bf16 / fp32 speed of a ViT training step by width and tokens.

``precision="auto"`` is fp32 on every CPU (``vitssl_core.runtime.resolve_precision``). This
script is the evidence: for each width D and token count N it times one training step (forward,
cross-entropy, backward; no optimizer) of a two-block ``vitssl_core.ViT`` in fp32 and under
``torch.autocast("cpu", dtype=torch.bfloat16)``, with the same weights and batch. The two
precisions run in one process and alternate every iteration (fp32, bf16, bf16, fp32, ...), so load
from other processes hits both alike; the figure is the median over iterations of the paired ratio
t_fp32 / t_bf16 of process CPU time (one thread), so ``speed`` > 1 means bf16 is faster. It also
prints whether the CPU multiplies bf16 natively (the ``avx512_bf16`` or ``amx_bf16`` flags; without
them oneDNN emulates bf16 and every row is far below 1).

Tokens are set by the patch size at 28 px: patch 7 gives N = 17 (``vit_mini_28``), patch 4 gives
N = 50 (``vit_tiny_28``), patch 2 gives N = 197 (as ViT-B/16 at 224 px). Each row is timed at two
head widths D/h: 32 (``vit_mini_28``) and 64 (``vit_tiny_28``, ViT-B). The batch shrinks as D * N
grows, to keep each step short. A last row times the issue's case: the whole ``vit_mini_28`` at
batch 256 with its AdamW step.

    OMP_NUM_THREADS=1 python benchmarks/precision_speed.py            # the table below, 1.5 CPU-minutes
    OMP_NUM_THREADS=1 python benchmarks/precision_speed.py --widths 128,768 --patches 7 --head-dims 32

Measured on a 2-core AMD EPYC (capability AVX512, native bf16: avx512_bf16, no AMX), torch 2.14,
one thread, on a machine shared with a training run. speed = bf16 / fp32 in images/s (paired
median); from run to run a row moves by about +-0.05.

=======  ===  =====  ==========  ==========
width D  N    batch  speed d=32  speed d=64
=======  ===  =====  ==========  ==========
128      17   188    0.98        1.22
128      50   64     1.08        1.32
128      197  16     1.24        1.39
192      17   125    0.99        1.21
192      50   42     1.08        1.35
192      197  10     1.29        1.51
384      17   62     1.23        1.42
384      50   21     1.34        1.54
384      197  5      1.46        1.60
768      17   31     1.46        1.65
768      50   10     1.60        1.74
768      197  4      1.68        1.73
=======  ===  =====  ==========  ==========

``vit_mini_28``, batch 256, forward + backward + AdamW: **0.82** (bf16 slower; the issue measured
0.84 for the whole ``vitssl pretrain`` run on another AVX512-BF16 machine).

Reading: with native bf16, bf16 pays for wide layers (D >= 384), many tokens, or 64-wide heads; at
``vit_mini_28``'s shape (D = 128, N = 17, 32-wide heads) it does not, and a whole training step is
slower. Without native bf16 oneDNN emulates it and every row falls far below 1. So
``precision="auto"`` stays fp32 on CPUs, where it can never slow a run, and ``--precision bf16`` is
the explicit choice for the shapes where this table says it pays: time a few steps first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vitssl_core import ViT, vit_mini_28


def native_bf16() -> str:
    """The CPU flags that give native bf16 arithmetic ("none" when there are none)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown (no /proc/cpuinfo)"
    found = sorted({f for f in flags.split() if f in ("avx512_bf16", "amx_bf16", "amx_tile")})
    return ", ".join(found) or "none"


def step_seconds(model: ViT, x: torch.Tensor, y: torch.Tensor, bf16: bool, optimizer=None) -> float:
    """Process CPU seconds of one forward + cross-entropy + backward (+ an AdamW step if given)."""
    model.zero_grad(set_to_none=True)
    start = time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)  # (B, 10)
    F.cross_entropy(logits.float(), y).backward()
    if optimizer is not None:
        optimizer.step()
    return time.process_time() - start


def measure(model: ViT, batch: int, iters: int, full: bool = False) -> float:
    """Median paired t_fp32 / t_bf16 (> 1: bf16 is faster) of training steps of ``model``."""
    torch.manual_seed(0)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True) if full else None
    for bf16 in (False, True):  # warm-up: oneDNN picks and caches its kernels
        step_seconds(model, x, y, bf16, optimizer)
    ratios = []
    for i in range(iters):
        order = (False, True) if i % 2 == 0 else (True, False)
        t = {bf16: step_seconds(model, x, y, bf16, optimizer) for bf16 in order}
        ratios.append(t[False] / t[True])
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="128,192,384,768", help="comma-separated widths D")
    parser.add_argument(
        "--patches", default="7,4,2", help="comma-separated patch sizes at 28 px (7: N=17, 4: N=50, 2: N=197)"
    )
    parser.add_argument("--head-dims", default="32,64", help="comma-separated head widths D/h (default: 32,64)")
    parser.add_argument("--iters", type=int, default=6, help="timed pairs per row (default: 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--quick", action="store_true", help="one tiny row and a tiny last row: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.widths, args.patches, args.head_dims, args.iters = "32", "7", "16", 1
    torch.set_num_threads(args.threads)
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}; native bf16: {native_bf16()}; "
        f"torch {torch.__version__}, {args.threads} thread(s)"
    )
    dims = list(map(int, args.head_dims.split(",")))
    print(f"{'width D':>7} {'N':>4} {'batch':>5} " + " ".join(f"{f'speed d={d}':>11}" for d in dims))
    for width in map(int, args.widths.split(",")):
        for patch in map(int, args.patches.split(",")):
            tokens = (28 // patch) ** 2 + 1
            batch = max(4, 64 * 128 * 50 // (width * tokens))  # about the same work in every row
            speeds = []
            for dim in dims:
                torch.manual_seed(0)
                model = ViT(28, patch, 1, num_classes=10, embed_dim=width, depth=2, num_heads=max(1, width // dim))
                speeds.append(measure(model, batch, args.iters))
            print(f"{width:>7} {tokens:>4} {batch:>5} " + " ".join(f"{v:>11.2f}" for v in speeds), flush=True)
    # The case: the whole vit_mini_28 (6 blocks, D=128, N=17), batch 256, with the AdamW step.
    torch.manual_seed(0)
    whole = vit_mini_28(num_classes=10, **({"depth": 1, "embed_dim": 32, "num_heads": 2} if args.quick else {}))
    speed = measure(whole, 8 if args.quick else 256, max(2, args.iters // 2), full=True)
    print(f"vit_mini_28, batch 256, forward + backward + AdamW: speed {speed:.2f}")


if __name__ == "__main__":
    main()
