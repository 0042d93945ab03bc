"""Training speed of vit_tiny_28 in fp32 against bf16 autocast, and whether the two learn alike.

1. Speed: one process, two copies of the same Supervised ViT-Tiny (28 px, patch 4, D=192, 12
   blocks), each with its AdamW; their steps alternate batch by batch (which precision goes
   first alternates too), so a busy machine slows both alike. Prints the median img/s of each
   and the ratio bf16 / fp32.
2. Agreement: ``vitssl_core.train.train`` runs each precision from the same initial weights on
   the same batches; prints both loss curves and their largest relative difference.

    python benchmarks/train_speed.py                 # batch 32, 5 timed steps each, 30-step curves of batch 16
    python benchmarks/train_speed.py --threads 1 --batch-size 128 --steps 10

bf16 autocast pays off where the CPU has native bf16 kernels (AVX-512 BF16 / AMX, which
``torch.backends.cpu.get_cpu_capability()`` reports as AVX512) or on a GPU; on AVX2 oneDNN
emulates bf16 and the ratio is below 1, which is why ``precision="auto"`` picks fp32 there.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.utils.data import Subset

from vitssl_core import vit_tiny_28
from vitssl_core.data import FashionMNIST, normalize
from vitssl_core.supervised import Supervised
from vitssl_core.runtime import resolve_precision
from vitssl_core.train import TrainConfig, train


def timed_step(method: Supervised, optimizer: torch.optim.Optimizer, batch, bf16: bool) -> float:
    """Seconds for one forward + backward + AdamW step."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = method.training_step(batch)
    loss.float().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32, help="batch of the timed steps")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per precision (after 1 untimed)")
    parser.add_argument("--curve-steps", type=int, default=30, help="steps of each loss curve")
    parser.add_argument("--curve-batch-size", type=int, default=16, help="batch of the loss curves")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="tiny batches, two steps each: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.curve_steps, args.curve_batch_size = 4, 1, 2, 4
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{args.threads} thread(s); precision='auto' here means {resolve_precision('auto', 'cpu')}",
        flush=True,
    )

    norm = normalize("fashion_mnist")
    data = FashionMNIST(train=False, transform=norm)
    n = max(args.batch_size * (args.steps + 1), args.curve_batch_size * args.curve_steps)
    images = torch.stack([data[i][0] for i in range(n)])  # (n, 1, 28, 28)
    labels = data.targets[:n]
    batches = [
        (images[i : i + args.batch_size], labels[i : i + args.batch_size])
        for i in range(0, args.batch_size * (args.steps + 1), args.batch_size)
    ]

    # ---- 1. speed, interleaved
    torch.manual_seed(0)
    methods = {"fp32": Supervised(vit_tiny_28(), num_classes=10)}
    methods["bf16"] = copy.deepcopy(methods["fp32"])
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in methods.items()}
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(args.steps + 1):  # the first round warms up the kernels and is not counted
        order = ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")
        for precision in order:
            t = timed_step(methods[precision], optimizers[precision], batches[i], precision == "bf16")
            if i >= 1:
                times[precision].append(t)
    speed = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
    print(f"\nspeed, median of {args.steps} interleaved steps of batch {args.batch_size}:")
    for k, v in speed.items():
        print(f"  {k}: {v:8.1f} img/s")
    print(f"  bf16 / fp32 = {speed['bf16'] / speed['fp32']:.2f}x", flush=True)

    # ---- 2. the loss curves agree
    dataset = Subset(torch.utils.data.TensorDataset(images, labels), range(n))
    torch.manual_seed(0)
    init = Supervised(vit_tiny_28(), num_classes=10)
    curves = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig(
            max_steps=args.curve_steps,
            batch_size=args.curve_batch_size,
            blr=1e-3,
            warmup_steps=min(3, args.curve_steps // 2),
            precision=precision,
            log_every=1,
            progress=False,
            seed=0,
        )
        curves[precision] = [row["loss"] for row in train(copy.deepcopy(init), dataset, config)]
    rel = [abs(b - a) / abs(a) for a, b in zip(curves["fp32"], curves["bf16"])]
    print(f"\nloss curves over {args.curve_steps} steps of batch {args.curve_batch_size}, same init, same batches:")
    print("  step   fp32     bf16")
    for step in range(0, args.curve_steps, max(1, args.curve_steps // 10)):
        print(f"  {step + 1:4d}  {curves['fp32'][step]:.4f}  {curves['bf16'][step]:.4f}")
    print(f"  final {curves['fp32'][-1]:.4f}  {curves['bf16'][-1]:.4f}")
    print(f"  max relative difference {max(rel):.4f}, mean {statistics.mean(rel):.4f}")


if __name__ == "__main__":
    main()
