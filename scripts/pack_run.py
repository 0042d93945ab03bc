"""Pack a finished `vitssl pretrain` run into one small .tar.gz for the trip back from a GPU machine.

    python scripts/pack_run.py RUN OUT.tar.gz

What scripts/ship_checkpoint.py needs and nothing more: backbone.safetensors and backbone.json,
history.jsonl, run.json, config.json, train.log and capped.txt (when present), for MAE ``decoder.safetensors``
(the decoder of the newest checkpoint, MAE's key names) and for a supervised run ``head.safetensors`` (its
classifier), which ship_checkpoint reads in place of the training checkpoints. The training checkpoints (optimizer moments: tens of MB) stay behind.
Unpack with ``tar -xzf OUT.tar.gz -C DIR`` and run ``python scripts/ship_checkpoint.py DIR/NAME``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

from safetensors.torch import save_file

from vitssl_core.checkpoint import load_checkpoint
from vitssl_core.mae import decoder_state_dict
from vitssl_core.supervised import head_state_dict

FILES = ("backbone.safetensors", "backbone.json", "history.jsonl", "run.json", "config.json", "train.log", "capped.txt")
LIMIT = 16 * 1024 * 1024  # what one file may weigh on the way back


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished `vitssl pretrain` --out folder")
    parser.add_argument("out", type=Path, help="the .tar.gz to write")
    args = parser.parse_args(argv)
    run = args.run
    for need in ("backbone.safetensors", "backbone.json"):
        if not (run / need).is_file():
            parser.error(f"{run} has no {need}: the run has not finished")
    method = json.loads((run / "backbone.json").read_text()).get("method")
    extra = {"mae": ("decoder.safetensors", decoder_state_dict), "supervised": ("head.safetensors", head_state_dict)}
    if method in extra:  # what the card needs beyond the backbone, from the newest checkpoint
        name, part = extra[method]
        weights, _ = load_checkpoint(run / "checkpoints")
        save_file({k: v.contiguous() for k, v in part(weights).items()}, str(run / name))
    tmp = args.out.with_name(args.out.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name in (*FILES, "decoder.safetensors", "head.safetensors"):
            if (run / name).is_file():
                tar.add(run / name, arcname=f"{run.name}/{name}")
    if tmp.stat().st_size > LIMIT:
        tmp.unlink()
        print(f"pack_run: {args.out} would be over 16 MiB", file=sys.stderr)
        return 1
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
