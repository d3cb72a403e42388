"""The ImageNet-subset path on a tiny generated ImageFolder: loading, triggers, network."""
import argparse

import numpy as np
import pytest
import torch

from dataloader_bd import build_datasets, load_raw
from models import get_network
from utils.args import validate_args
from utils.errors import UserError


def _folder(root):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02", "n03"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def _args(root, **kw):
    a = argparse.Namespace(dataset="imagenet", data_root=str(root), data_file=None, num_workers=0, seed=1000,
                           poison_rate=0.5, target_type="all2one", target_label=0,
                           trigger_type="squareTrigger_imagenet", blend_image=None, model="resnet18", width=64)
    vars(a).update(kw)
    return validate_args(a)


def test_image_folder_loads_resized_and_poisons(tmp_path):
    _folder(tmp_path)
    args = _args(tmp_path)
    x_train, y_train, x_test, y_test = load_raw(args)
    assert x_train.shape == (9, 3, 224, 224) and x_train.dtype == torch.uint8
    assert sorted(y_train.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(y_test) == 9
    train, tests = build_datasets(args, raw=(x_train, y_train, x_test, y_test))
    assert len(train.poison_indices) == 3                       # floor(0.5 * 6 non-target)
    assert (train.images[train.poison_indices][:, :, -22:, -22:] == 255).all()   # floor(0.1 * 224) = 22
    assert len(tests.bd_targets) == 6 and (tests.bd_targets == 0).all()


def test_imagenet_network_and_missing_folder(tmp_path):
    args = _args(tmp_path)
    model = get_network(args).eval()
    with torch.no_grad():
        x = torch.rand(2, 3, 224, 224)
        assert model(x).shape == (2, 200) and model.features(x).shape == (2, 512)
    with pytest.raises(UserError, match="train"):
        load_raw(args)
