"""Training curves (vitssl_core/curves.py) and `vitssl plot`, on the history.jsonl of real tiny CLI runs."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import model_args

from vitssl_core import __main__ as cli
from vitssl_core.curves import PANELS, plot_history, read_history


def pretrain(out, steps: int, *extra: str) -> None:
    argv = ["pretrain", "--method", "supervised", "--steps", str(steps), "--subset", "64", "--batch-size", "16"]
    argv += ["--log-every", "1", "--no-progress", "--precision", "fp32", "--feature-validation", "0"]
    assert cli.main([*argv, "--out", str(out), *model_args(depth=1), *extra]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory, needs_fashion_mnist):
    root = tmp_path_factory.mktemp("plot")
    pretrain(root / "short", 4)
    pretrain(root / "long", 6, "--lr", "1e-3")
    return root


def test_read_history_gives_the_trainers_rows_and_skips_a_half_written_line(runs, tmp_path):
    rows = read_history(runs / "short")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["epoch"] == 1.0
    assert read_history(runs / "short" / "history.jsonl") == rows
    running = tmp_path / "running"
    shutil.copytree(runs / "short", running)
    with open(running / "history.jsonl", "a") as f:
        f.write('{"step": 5, "epo')  # the trainer is writing this line right now
    assert read_history(running) == rows


def test_plot_history_overlays_every_run_in_every_logged_panel(runs):
    histories = {name: read_history(runs / name) for name in ("short", "long")}
    fig = plot_history(histories)
    axes = fig.axes
    assert [ax.get_title() for ax in axes[: len(PANELS)]] == [title for _, _, title in PANELS]
    loss = axes[0]
    assert [line.get_label() for line in loss.lines] == ["short", "long"]
    assert list(loss.lines[1].get_ydata()) == [r["loss"] for r in histories["long"]]
    assert list(loss.lines[1].get_xdata()) == [r["epoch"] for r in histories["long"]]
    assert all(len(ax.lines) == 2 for key, ax in zip((k for k, _, _ in PANELS), axes) if key in ("lr", "img_per_s"))
    knn = axes[2]  # not monitored in these runs: the panel says how to get it
    assert not knn.lines and "--knn-every" in knn.texts[0].get_text()
    assert [t.get_text() for t in axes[-1].get_legend().get_texts()] == ["short", "long"]


def test_cli_plot_writes_the_figure(runs, tmp_path, capsys):
    out = tmp_path / "figs" / "curves.png"
    assert cli.main(["plot", str(runs / "short"), str(runs / "long" / "history.jsonl"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == str(out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/nothing"], "no history.jsonl"),
        (["{tmp}/empty"], "no rows yet"),
        (["{tmp}/notjson"], "line 1 is not JSON"),
        (["{tmp}/notrows"], "not a history row"),
        (["{runs}/short", "{runs}/short"], "given twice"),
        (["{runs}/short", "--out", "{tmp}/x.jpg"], "give a .png, .pdf or .svg"),
    ],
)
def test_cli_plot_bad_inputs_exit_2_with_one_line(args, message, runs, tmp_path, capsys):
    for name, text in (("empty", ""), ("notjson", "step 1\n{}\n"), ("notrows", json.dumps([1, 2]) + "\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "history.jsonl").write_text(text)
    argv = ["plot", *(a.replace("{tmp}", str(tmp_path)).replace("{runs}", str(runs)) for a in args)]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "f.png")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
