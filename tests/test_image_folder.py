"""--data_file as an image folder or a .tar / .tar.gz in that layout (utils/image_folder.py): labels
from the sorted class names, one decode cached under --data_root, one-line errors for a damaged
archive, a class missing from a split and mixed image sizes."""
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import parse_script_args
from dataloader_bd import load_raw
from utils.args import validate_args
from utils.errors import UserError
from utils.image_folder import cached_arrays, decode, source_stem
from utils.paths import dataset_tag

CLASSES = ["bird", "airplane", "cat"]   # sorted: airplane 0, bird 1, cat 2


def make_folder(root, classes=CLASSES, sizes=None, per_class=(3, 2), fmt="png"):
    """train/<class>/i.<fmt> and test/<class>/i.<fmt>; image i of class c is filled with 10 c + i."""
    for split, n in zip(("train", "test"), per_class):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                side = (sizes or {}).get((split, name, i), 32)
                Image.fromarray(np.full((side, side, 3), 10 * c + i, np.uint8)).save(root / split / name / f"{i:04d}.{fmt}")
    return root


def make_tar(folder, path, top="cifar10"):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=top)
    return path


def test_labels_follow_the_sorted_class_names(tmp_path):
    arrays = decode(make_folder(tmp_path / "imgs"))
    assert arrays["x_train"].shape == (9, 32, 32, 3) and arrays["x_test"].shape == (6, 32, 32, 3)
    assert arrays["y_train"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # airplane (label 0) was written as class index 1 of CLASSES: values 10..12
    assert arrays["x_train"][:3, 0, 0, 0].tolist() == [10, 11, 12]
    assert arrays["x_test"][:, 0, 0, 0].tolist() == [10, 11, 0, 1, 20, 21]


def test_archive_is_decoded_once_and_reused(tmp_path):
    archive = make_tar(make_folder(tmp_path / "imgs"), tmp_path / "tiny_set.tar.gz")
    cache = cached_arrays(archive, tmp_path / "data_root")
    assert cache.name.startswith("tiny_set-") and cache.suffix == ".npz"
    stamp = os.stat(cache).st_mtime_ns
    assert cached_arrays(archive, tmp_path / "data_root") == cache and os.stat(cache).st_mtime_ns == stamp
    folder_arrays = decode(tmp_path / "imgs")
    with np.load(cache, allow_pickle=False) as saved:
        for k, v in folder_arrays.items():
            assert np.array_equal(saved[k], v)


def test_data_file_takes_an_archive_with_a_short_tag(tmp_path):
    archive = make_tar(make_folder(tmp_path / "imgs", classes=[f"c{i}" for i in range(10)]),
                       tmp_path / "cifar10_jpeg.tar.gz")
    args = validate_args(parse_script_args("train_attack_noTrans", tmp_path / "saved", "--dataset", "cifar10",
                                           "--data_file", archive, "--data_root", tmp_path / "data_root"))
    assert dataset_tag(args) == "cifar10-cifar10_jpeg" and source_stem(archive) == "cifar10_jpeg"
    x_train, y_train, x_test, y_test = load_raw(args)
    assert x_train.shape == (30, 3, 32, 32) and y_test.tolist() == [i // 2 for i in range(20)]


def test_damaged_archive_is_one_line(tmp_path):
    archive = make_tar(make_folder(tmp_path / "imgs"), tmp_path / "set.tar.gz")
    data = archive.read_bytes()
    archive.write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="damaged archive"):
        cached_arrays(archive, tmp_path / "data_root")
    assert not (tmp_path / "data_root").exists()


def test_class_missing_from_test_is_named(tmp_path):
    root = make_folder(tmp_path / "imgs")
    for f in (root / "test" / "cat").iterdir():
        f.unlink()
    (root / "test" / "cat").rmdir()
    with pytest.raises(UserError, match="class folder 'cat' is missing from test/"):
        decode(root)


def test_mixed_image_sizes_are_named(tmp_path):
    root = make_folder(tmp_path / "imgs", sizes={("test", "bird", 1): 28})
    with pytest.raises(UserError, match="mixed image sizes: .* test/bird/0001.png is 28x28"):
        decode(root)


def test_unreadable_image_is_named(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "cat" / "0001.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="train/cat/0001.png is not a readable image"):
        decode(root)
