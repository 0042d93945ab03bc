"""The methods' small-image recipes (vitssl_core/recipes.py): the CLI and Python users build the same thing."""

import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import TINY, model_args
from vitssl_core import ViT, data, recipes
from vitssl_core import __main__ as cli
from vitssl_core.batch_augment import BatchViews
from vitssl_core.contrastive import SimCLR
from vitssl_core.dino import DINO
from vitssl_core.runtime import seed_everything
from vitssl_core.supervised import Supervised

STATS = data.NORMALIZE["fashion_mnist"]
INFO = recipes.DataInfo("fashion_mnist", 28, 1, tuple(STATS["mean"]), tuple(STATS["std"]), 10)


def tiny(**kw) -> ViT:
    return ViT(**{**TINY, **kw})


def test_the_cli_reads_the_library_tables():
    assert cli.METHODS is recipes.METHODS and cli.PRESETS is recipes.PRESETS and cli.DataInfo is recipes.DataInfo
    assert set(recipes.METHODS) == {"supervised", "simclr", "mocov3", "dino", "mae", "simmim", "beit"}


def test_build_method_uses_the_small_image_defaults_and_keywords_override_them():
    simclr = recipes.build_method("simclr", tiny(), INFO)
    assert isinstance(simclr, SimCLR) and simclr.temperature == 0.2 and simclr.projector[0].out_features == 512
    assert recipes.build_method("simclr", tiny(), INFO, temperature=0.5).temperature == 0.5
    supervised = recipes.build_method("supervised", tiny(), INFO)  # num_classes from the data
    assert isinstance(supervised, Supervised) and supervised.head.out_features == 10


def test_dino_converts_epochs_to_steps_and_needs_them():
    dino = recipes.build_method("dino", tiny(), INFO, epoch_steps=10, total_steps=100)
    assert isinstance(dino, DINO) and dino.freeze_last_layer_steps == 10 and dino.warmup_teacher_temp_steps == 50
    assert dino.backbone.dynamic_img_size  # its local crops are smaller than the image
    mine = tiny()
    assert not mine.dynamic_img_size
    dino = recipes.build_method("dino", mine, INFO, epoch_steps=10, total_steps=100)
    assert not mine.dynamic_img_size and dino.backbone is not mine  # the caller's backbone is left alone
    assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), dino.backbone.state_dict().values()))
    dynamic = tiny(dynamic_img_size=True)
    assert recipes.build_method("dino", dynamic, INFO, epoch_steps=10, total_steps=100).backbone is dynamic
    with pytest.raises(ValueError, match="epoch_steps"):
        recipes.build_method("dino", tiny(), INFO)
    with pytest.raises(ValueError, match="dataset="):
        recipes.build_method("beit", tiny(), INFO)
    with pytest.raises(ValueError, match="'byol' is unknown"):
        recipes.build_method("byol", tiny(), INFO)
    with pytest.raises(TypeError, match="DataInfo"):
        recipes.build_method("simclr", tiny(), {"img_size": 28})


def test_training_data_wraps_per_image_recipes_and_returns_batch_views():
    base = TensorDataset(torch.rand(8, 1, 28, 28), torch.arange(8) % 2)
    dataset, views = recipes.training_data("simclr", base, INFO, recipes.build_method("simclr", tiny(), INFO))
    assert dataset is base and isinstance(views, BatchViews)
    dataset, views = recipes.training_data("mae", base, INFO, recipes.build_method("mae", tiny(), INFO))
    assert isinstance(dataset, recipes.Transformed) and views is None and len(dataset) == 8
    image, label = dataset[3]
    assert image.shape == (1, 28, 28) and label == base[3][1]


def test_the_cli_builds_exactly_what_the_library_builds(needs_fashion_mnist):
    argv = [
        "pretrain",
        "--method",
        "mocov3",
        "--steps",
        "2",
        "--subset",
        "64",
        "--batch-size",
        "16",
        "--out",
        "x",
        *model_args(img_size=28),
    ]
    args = cli.parse_args(argv)
    seed_everything(0)
    from_cli, base, info = cli._build_method(args, cli._train_config(args), world_size=1)
    assert info == INFO and len(base) == 64
    seed_everything(0)
    from_library = recipes.build_method("mocov3", recipes.PRESETS["vit_tiny_28"](**args.model_args), INFO)
    expected = from_library.state_dict()
    assert from_cli.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in from_cli.state_dict().items())


def test_the_supervised_baseline_can_train_on_the_images_as_they_are():
    # the baseline matched to the fine-tuning protocol sees no crops and no flips, only the normalisation
    base = TensorDataset(torch.rand(4, 1, 28, 28), torch.arange(4))
    plain = recipes.build_method("supervised", tiny(), INFO, augment="none")
    dataset = recipes.training_data("supervised", base, INFO, plain)[0]
    for i in range(4):
        expected = (base[i][0] - INFO.mean[0]) / INFO.std[0]
        torch.testing.assert_close(dataset[i][0], expected)
    augmented = recipes.training_data("supervised", base, INFO, recipes.build_method("supervised", tiny(), INFO))[0]
    torch.manual_seed(0)
    assert any(not torch.allclose(augmented[i][0], (base[i][0] - INFO.mean[0]) / INFO.std[0]) for i in range(4))
    with pytest.raises(ValueError, match="augment='mixup' is not one of"):
        recipes.build_method("supervised", tiny(), INFO, augment="mixup")
