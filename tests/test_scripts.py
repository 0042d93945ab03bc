"""Smoke tests: every benchmark and script runs end to end with ``--quick`` (tiny sizes, seconds).

They check that the programs still run against today's package, not what they measure.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitssl_core import Supervised, load_pretrained
from vitssl_core.pretrained import PRETRAINED
from vitssl_core.checkpoint import latest_checkpoint, load_backbone, load_checkpoint, save_checkpoint
from vitssl_core.data import load_fashion_mnist_tensors
from vitssl_core.features import prepare_images
from vitssl_core.paired import correct_from_hex

REPO = Path(__file__).resolve().parents[1]
NEEDS_DATA = {"method_speed.py", "train_speed.py", "finetune_crop.py", "knn_monitor_cost.py"}


def run(path: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(path), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{path.name} {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "benchmarks").glob("*.py")))
def test_benchmark_runs_quick(name, tmp_path, request):
    if name in NEEDS_DATA:
        request.getfixturevalue("needs_fashion_mnist")
    done = run(REPO / "benchmarks" / name, "--quick", cwd=tmp_path)
    assert done.stdout.strip(), f"{name} printed nothing"


@pytest.mark.parametrize(
    "what, method",
    [
        (["--random"], "random"),
        (["--remeasure", str(PRETRAINED / "random.json")], "random"),  # a card without train_config
        (["--remeasure", str(PRETRAINED / "mae.json")], "mae"),  # a card with a decoder
    ],
)
def test_ship_checkpoint_quick_writes_a_loadable_card(what, method, tmp_path, needs_fashion_mnist):
    run(
        REPO / "scripts" / "ship_checkpoint.py",
        *what,
        "--name",
        "quick",
        "--quick",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
        cwd=tmp_path,
    )
    card = json.loads((tmp_path / "quick.json").read_text())
    assert card["method"] == method and card["protocols"]["finetune"]["epochs"] == 1
    if what[0] == "--remeasure":  # the training record and weights are the shipped ones
        shipped = json.loads(Path(what[1]).read_text())
        ours, theirs = (
            load_backbone(tmp_path / "quick.safetensors"),
            load_backbone(Path(what[1]).with_suffix(".safetensors")),
        )
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert card["seed"] == shipped["seed"] and card["train_segments"] == shipped["train_segments"]
        assert card.get("decoder") == shipped.get("decoder")
        # the shipped fine-tuning number was made under another protocol: kept, not lost
        assert card["superseded"]["metrics"]["finetune"] == shipped["metrics"]["finetune"]
        assert card["superseded"]["protocols"]["finetune"] == shipped["protocols"]["finetune"]
        assert card["superseded"]["correct"]["finetune"] == shipped["correct"]["finetune"]
    backbone, loaded = load_pretrained(tmp_path / "quick.safetensors")
    assert loaded["feature"] == card["feature"] and backbone.embed_dim == card["model"]["embed_dim"]
    for key, value in card["metrics"].items():  # each number is the share of its per-image record
        correct = correct_from_hex(card["correct"][key], 200)
        assert value == pytest.approx(100 * correct.float().mean().item(), abs=0.005), key


def _ship_module():
    spec = importlib.util.spec_from_file_location("ship_checkpoint", REPO / "scripts" / "ship_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_remeasure_keeps_the_numbers_whose_protocol_changed():
    superseded = _ship_module()._superseded
    protocols = {"knn": {"k": 20}, "linear": "probe", "finetune": {"epochs": 10}, "label_fractions": "subset"}
    metrics = {"knn": 80.0, "linear": 81.0, "finetune": 90.0, "label_1pct": 70.0, "label_10pct": 75.0}
    old = {
        "metrics": metrics,
        "protocols": protocols,
        "code_revision": "abc",
        "superseded": {"finetune": 85.0},
        "correct": {"knn": "ff", "finetune": "0f"},
    }
    same = {"protocols": dict(protocols)}
    assert superseded(old, same) == {"finetune": 85.0}  # nothing replaced: the older record is carried over
    longer = {"protocols": {**protocols, "finetune": {"epochs": 20}, "label_fractions": "scratch"}}
    assert superseded(old, longer) == {
        "metrics": {"finetune": 90.0, "label_1pct": 70.0, "label_10pct": 75.0},
        "protocols": {"finetune": {"epochs": 10}, "label_fractions": "subset"},
        "correct": {"finetune": "0f"},
        "code_revision": "abc",
        "earlier": {"finetune": 85.0},
    }
    unmeasured = {**old, "metrics": {**metrics, "finetune": None}, "superseded": None}
    assert superseded(unmeasured, {"protocols": {**protocols, "finetune": {"epochs": 20}}}) is None


def test_ship_checkpoint_quick_refuses_the_shipped_folder(capsys):
    module = _ship_module()
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--random", "--name", "x", "--quick"])  # --out defaults to vitssl_core/pretrained/
    assert exit_info.value.code == 2 and "outside vitssl_core/pretrained/" in capsys.readouterr().err


def test_offline_site_quick_builds_a_page(tmp_path):
    done = run(REPO / "scripts" / "offline_site.py", "--quick", cwd=tmp_path)
    assert "loads Mermaid without ES modules" in done.stdout


def test_own_head_scores_the_supervised_run_as_it_classifies(tmp_path, needs_fashion_mnist):
    # A supervised run's fine-tuning column with --own-head is the run's own classifier on the shipped
    # backbone: the per-image record must equal what the Supervised module itself predicts, whether the
    # head is read from the run's checkpoint or from the head.safetensors that scripts/pack_run.py writes.
    run_dir = tmp_path / "sup"
    cmd = [sys.executable, "-m", "vitssl_core", "pretrain", "--method", "supervised", "--subset", "256"]
    cmd += ["--batch-size", "32", "--steps", "6", "--device", "cpu", "--precision", "fp32", "--no-progress"]
    cmd += [
        "--model-arg",
        "depth=1",
        "--model-arg",
        "embed_dim=32",
        "--model-arg",
        "num_heads=2",
        "--out",
        str(run_dir),
    ]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ship = ["--own-head", "--finetune-epochs", "0", "--quick", "--threads", "1"]
    run(
        REPO / "scripts" / "ship_checkpoint.py",
        str(run_dir),
        "--name",
        "sup",
        *ship,
        "--out",
        str(tmp_path),
        cwd=tmp_path,
    )
    card = json.loads((tmp_path / "sup.json").read_text())
    assert card["protocols"]["finetune"]["own_head"] and card["protocols"]["finetune"]["epochs"] is None
    backbone, _ = load_pretrained(tmp_path / "sup.json")  # the float16 weights that ship
    model = Supervised(backbone, num_classes=10)
    weights, _ = load_checkpoint(run_dir / "checkpoints")
    model.head.load_state_dict({"weight": weights["head.weight"], "bias": weights["head.bias"]})
    x_test, y_test = load_fashion_mnist_tensors(train=False)
    with torch.no_grad():
        expected = model.eval()(prepare_images(x_test[:200], torch.device("cpu"), card["normalize"])).argmax(1)
    assert torch.equal(correct_from_hex(card["correct"]["finetune"], 200), expected == y_test[:200])
    # the packed run: no checkpoints, the head in head.safetensors; the same record
    run(REPO / "scripts" / "pack_run.py", str(run_dir), str(tmp_path / "sup.tar.gz"), cwd=tmp_path)
    shutil.unpack_archive(tmp_path / "sup.tar.gz", tmp_path / "unpacked", filter="data")
    run(
        REPO / "scripts" / "ship_checkpoint.py",
        str(tmp_path / "unpacked" / "sup"),
        "--name",
        "sup2",
        *ship,
        "--out",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert json.loads((tmp_path / "sup2.json").read_text())["correct"]["finetune"] == card["correct"]["finetune"]


def test_own_head_refuses_a_fine_tune(capsys):
    module = _ship_module()
    with pytest.raises(SystemExit) as exit_info:
        module.main(["some_run", "--name", "x", "--own-head"])  # --finetune-epochs defaults to 20
    assert exit_info.value.code == 2 and "--finetune-epochs 0" in capsys.readouterr().err


def test_carry_run_saves_a_run_to_a_branch_and_restores_it_byte_for_byte(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts" / "carry_run.sh").write_bytes((REPO / "scripts" / "carry_run.sh").read_bytes())
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "main"], check=True)
    main_head = subprocess.run([*git, "rev-parse", "main"], capture_output=True, text=True).stdout

    runs = tmp_path / "runs"  # VITSSL_RUNS, outside the repository
    run_dir = runs / "results" / "tiny"
    for step in (3, 6):  # two checkpoints: save_checkpoint keeps the newest only
        save_checkpoint(run_dir / "checkpoints", step, {"w": torch.full((4, 4), float(step))}, {"step": step})
    (run_dir / "train.log").write_text("step 6 loss 1.0\n")
    (run_dir / "checkpoints" / "step_00000009.tmp").mkdir()  # a killed process's half-written folder
    (run_dir / "checkpoints" / "step_00000009.tmp" / "model.safetensors").write_bytes(b"half")
    before = {
        p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and ".tmp" not in str(p)
    }

    env = {
        **os.environ,
        "VITSSL_RUNS": str(runs),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }

    def carry(*args, code=0):
        done = subprocess.run(
            ["bash", str(repo / "scripts" / "carry_run.sh"), *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == code, done.stderr
        return done

    carry("save", "tiny")
    carry("save", "tiny")  # a second save replaces the first: one parentless commit
    assert subprocess.run([*git, "rev-list", "--count", "runs/tiny"], capture_output=True, text=True).stdout == "1\n"
    assert subprocess.run([*git, "rev-parse", "main"], capture_output=True, text=True).stdout == main_head
    assert subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout == ""

    carry("restore", "tiny", code=2)  # never over an existing run
    shutil.rmtree(runs)
    carry("restore", "tiny")
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # byte for byte, without the .tmp leftover
    assert latest_checkpoint(run_dir).name == "step_00000006"
    carry("save", "missing", code=2)
    carry("restore", "missing", code=2)


def test_a_dino_card_records_its_resampled_positions_as_a_deviation():
    module = _ship_module()
    arch = {"img_size": 28, "patch_size": 4, "dynamic_img_size": True}
    (note,) = module._deviations({"method": "dino", "architecture": arch})
    assert "7x7 positional table resampled" in note and "to 3x3" in note  # 12-px local crops on 4-px patches
    (note,) = module._deviations({"method": "dino", "architecture": dict(arch, patch_size=7)})
    assert "4x4" in note and "to 2x2" in note  # the 16-token card: 14-px local crops
    assert module._deviations({"method": "mae", "architecture": arch}) == []


def test_timm_knn_agrees_with_the_package_on_a_subset(capsys, needs_fashion_mnist):
    """scripts/timm_knn.py (timm's ViT, its own vote) against extract_features + knn_accuracy on the same images."""
    pytest.importorskip("timm")
    from vitssl_core import extract_features, knn_accuracy
    from vitssl_core.data import load_fashion_mnist_tensors

    spec = importlib.util.spec_from_file_location("timm_knn", REPO / "scripts" / "timm_knn.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        assert script.main(["random_p4", "--max-train", "1000", "--max-test", "250"]) == 0
    finally:
        torch.set_num_threads(threads)
    top1 = float(capsys.readouterr().out.split("timm kNN ")[1].split()[0])
    backbone, card = load_pretrained("random_p4")
    (x_train, y_train), (x_test, y_test) = (load_fashion_mnist_tensors(train=t) for t in (True, False))
    kw = dict(feature=card["feature"], normalize=card["normalize"], precision="fp32")
    ours = knn_accuracy(
        extract_features(backbone, x_train[:1000], **kw),
        y_train[:1000],
        extract_features(backbone, x_test[:250], **kw),
        y_test[:250],
    )
    assert abs(top1 - ours) <= 0.5, (top1, ours)  # 250 queries: one image is 0.4 points


def test_executed_notebooks_reach_the_book_cache(tmp_path, capsys):
    """book/conftest.py keeps what nbval ran; scripts/cache_notebooks.py lets the build find it by hash."""
    import nbformat
    from jupyter_cache import get_cache

    book = tmp_path / "book"
    book.mkdir()
    shutil.copy(REPO / "book" / "conftest.py", book)

    def notebook(name: str, *sources: str) -> Path:
        nb = nbformat.v4.new_notebook(
            cells=[nbformat.v4.new_markdown_cell("# A page")] + [nbformat.v4.new_code_cell(s) for s in sources]
        )
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, str(book / name))
        return book / name

    glued = "from IPython.display import display\ndisplay({'text/plain': '7'}, raw=True, metadata={'scrapbook': {'name': 'n'}})"
    ok = notebook("ok.ipynb", "x = 6 * 7\nprint(x)", glued, "x")
    notebook("failing.ipynb", "print('before')", "raise ValueError('a failing cell')")
    edited = notebook("edited.ipynb", "y = 1")
    executed = tmp_path / "executed"
    env = {**os.environ, "VITSSL_EXECUTED_DIR": str(executed), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("PYTEST_ADDOPTS", None)  # CI's workers and durations are not this run's
    pytest_args = ["-q", "-p", "no:cacheprovider", "-o", "addopts=", "--nbval-lax", "--nbval-current-env", "book"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *pytest_args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "1 failed" in done.stdout, done.stdout[-3000:]
    # the failing notebook is not kept: the build must execute it and show its error
    assert sorted(p.name for p in executed.rglob("*.ipynb")) == ["edited.ipynb", "ok.ipynb"]
    notebook("edited.ipynb", "y = 2")  # changed after it ran

    spec = importlib.util.spec_from_file_location("cache_notebooks", REPO / "scripts" / "cache_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(executed), str(tmp_path / "cache"), "--root", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "cached 1 executed notebook(s)" in printed and "book/edited.ipynb" in printed, printed

    cache = get_cache(str(tmp_path / "cache"))  # what myst-nb does in execute_notebooks: cache mode
    cache.match_cache_notebook(nbformat.read(str(ok), as_version=4))
    _, merged = cache.merge_match_into_notebook(nbformat.read(str(ok), as_version=4))
    code = [c for c in merged.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == [1, 2, 3]
    assert code[0].outputs[0].text == "42\n"
    assert code[1].outputs[0].metadata == {"scrapbook": {"name": "n"}}  # myst-nb's glue reads this metadata
    assert code[2].outputs[0].data["text/plain"] == "42" and code[2].outputs[0].execution_count == 3
    with pytest.raises(KeyError):
        cache.match_cache_notebook(nbformat.read(str(edited), as_version=4))
