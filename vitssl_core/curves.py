"""Training curves: the rows of a run's ``history.jsonl`` drawn against the epoch.

``read_history(run)`` reads the rows the trainer appended (``vitssl_core.train``), also from a run
that is still writing them; ``plot_history({label: rows, ...})`` draws the loss, the learning
rate, the kNN top-1 and embedding spread of the ``--knn-every`` monitor, and the throughput, one
panel each, several runs overlaid. ``vitssl plot`` is the command-line front end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

__all__ = ["PANELS", "read_history", "plot_history"]

HISTORY_FILE = "history.jsonl"  # as train.HISTORY_FILE; not imported, so drawing needs no trainer
# (row key, axis label, panel title): what a panel draws
PANELS = (
    ("loss", "loss", "Training loss"),
    ("lr", "learning rate", "Learning rate"),
    ("knn_top1", "kNN top-1 (%)", "kNN top-1 on held-out training images"),
    ("embedding_std", "std of l2-normalised embeddings", "Embedding spread (falls at collapse)"),
    ("img_per_s", "images / s", "Throughput"),
)
_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v")]


def read_history(run: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``run/history.jsonl`` (or of ``run`` itself, a ``.jsonl`` file), in order.

    A run still training may be caught halfway through writing its last line; that line is
    skipped. Raises FileNotFoundError without a history and ValueError for a file that is not
    one (a line before the last that is not a JSON object with ``"epoch"``) or has no rows yet.
    """
    path = Path(run)
    path = path / HISTORY_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"run={str(run)!r}: no {HISTORY_FILE} there (a 'vitssl pretrain --out' folder?)")
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:  # the line a running trainer is writing right now
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON; is this a history.jsonl?") from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), (int, float)):
            raise ValueError(f"{path}: line {i + 1} is not a history row (a JSON object with 'epoch')")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows yet (the trainer writes one every --log-every steps)")
    return rows


def plot_history(runs: dict[str, list[dict[str, Any]]], title: str | None = None) -> Figure:
    """One figure, a panel per ``PANELS`` key against the epoch, one line style per run and a legend.

    ``runs`` maps a label to its rows (``read_history``); a panel no run logged says so.
    """
    if not isinstance(runs, dict) or not runs:
        raise ValueError("runs must be a non-empty mapping of label -> history rows")
    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, label, panel_title) in zip(axes, PANELS):
        drawn = False
        for i, (name, rows) in enumerate(runs.items()):
            points = sorted((r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float)))
            if not points:
                continue
            ls, marker = _STYLES[i % len(_STYLES)]
            x, y = zip(*points)
            ax.plot(
                x,
                y,
                ls=ls,
                marker=marker if len(points) <= 30 else None,
                ms=4,
                color=str(0.6 * i / len(runs)),
                label=name,
            )
            drawn = True
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if key == "lr" and drawn:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if not drawn:
            hint = " (vitssl pretrain --knn-every N)" if key in ("knn_top1", "embedding_std") else ""
            ax.text(0.5, 0.5, f"not logged{hint}", ha="center", va="center", transform=ax.transAxes, color="0.4")
    legend = axes[-1]
    legend.axis("off")
    handles, labels = next(((a.get_legend_handles_labels()) for a in axes[:-1] if a.lines), ([], []))
    legend.legend(handles, labels, loc="center", title="run", fontsize=9)
    fig.suptitle(title or "Training curves from history.jsonl")
    return fig
