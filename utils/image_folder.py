"""Data in image-folder layout (``train/<class>/*``, ``test/<class>/*``) from a folder, a ``.tar`` or
a ``.tar.gz``: decoded once into a cached ``.npz`` (the arrays ``--data_file`` takes) under
``--data_root``, named by the source's fingerprint and reused by every later step.

Labels are the class folders sorted by name (for CIFAR-10: airplane ... truck = 0 ... 9). A single
top folder above ``train/`` and ``test/`` is allowed (``cifar10/train/...``). Within a class,
images are in file-name order, so the arrays are the same on every machine.
"""
import hashlib
import io
import tarfile
import zlib
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.files import atomic_write

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
SPLITS = ("train", "test")


def is_image_folder(path):
    """True for what this module reads: a folder, or a .tar / .tar.gz / .tgz file."""
    path = Path(path)
    return path.is_dir() or path.name.lower().endswith(ARCHIVE_SUFFIXES)


def source_stem(path):
    """The name without .npz / .tar / .tar.gz / .tgz: ``cifar10_jpeg.tar.gz`` -> ``cifar10_jpeg``."""
    name = Path(path).name
    for suffix in ARCHIVE_SUFFIXES + (".npz",):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return Path(path).stem


def fingerprint(path):
    """12 hex digits: sha256 of an archive's bytes, or of a folder's file names, sizes and times."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            st = p.stat()
            h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def cached_arrays(source, data_root):
    """The .npz for ``source`` under ``data_root`` (decoded now if it is not there yet)."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"--data_file {source} does not exist")
    cache = Path(data_root) / f"{source_stem(source)}-{fingerprint(source)}.npz"
    if not cache.is_file():
        arrays = decode(source)
        atomic_write(cache, lambda tmp: _save_npz(tmp, arrays))
        print(f"decoded {source} into {cache}: {len(arrays['y_train'])} training and "
              f"{len(arrays['y_test'])} test images, {arrays['x_train'].shape[1]}x{arrays['x_train'].shape[2]}")
    return cache


def _save_npz(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _entries(source):
    """{(split, class): [(file name, bytes reader)]} from a folder or an archive."""
    found = {}

    def add(parts, read):
        if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_SUFFIXES) or parts[-1].startswith("."):
            return
        split, cls = parts[-3], parts[-2]
        if split in SPLITS:
            found.setdefault((split, cls), []).append((parts[-1], read))

    if source.is_dir():
        for p in source.rglob("*"):
            if p.is_file():
                add(p.relative_to(source).parts, p.read_bytes)
        return found
    try:
        with tarfile.open(source, "r:*") as tar:
            for m in tar:
                if m.isfile():
                    data = tar.extractfile(m).read()
                    add(Path(m.name).parts, lambda data=data: data)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise UserError(f"--data_file {source} is a damaged archive ({err.__class__.__name__}: {err})") from None
    return found


def decode(source):
    """uint8 (N, H, W, 3) images and int64 labels of both splits, as a dict of the four arrays."""
    from PIL import Image, UnidentifiedImageError
    from utils.logger import progress
    source = Path(source)
    entries = _entries(source)
    classes = {split: sorted({c for s, c in entries if s == split}) for split in SPLITS}
    if not classes["train"]:
        raise UserError(f"--data_file {source} has no train/<class>/ images (image-folder layout: "
                        "train/<class>/*, test/<class>/*)")
    missing = sorted(set(classes["train"]) ^ set(classes["test"]))
    if missing:
        where = "test" if missing[0] in classes["train"] else "train"
        raise UserError(f"--data_file {source}: class folder '{missing[0]}' is missing from {where}/ "
                        f"(train has {len(classes['train'])} classes, test {len(classes['test'])})")
    out, size = {}, None
    for split in SPLITS:
        items = [(label, name, read) for label, cls in enumerate(classes["train"])
                 for name, read in sorted(entries[(split, cls)], key=lambda e: e[0])]
        images = []
        for label, name, read in progress(items, f"decoding {split}"):
            try:
                img = np.asarray(Image.open(io.BytesIO(read())).convert("RGB"))
            except (UnidentifiedImageError, OSError, ValueError) as err:
                raise UserError(f"--data_file {source}: {split}/{classes['train'][label]}/{name} is not a "
                                f"readable image ({err.__class__.__name__})") from None
            if size is None:
                size, first = img.shape, f"{split}/{classes['train'][label]}/{name}"
            elif img.shape != size:
                raise UserError(f"--data_file {source}: mixed image sizes: {first} is {size[1]}x{size[0]}, "
                                f"{split}/{classes['train'][label]}/{name} is {img.shape[1]}x{img.shape[0]}")
            images.append(img)
        out[f"x_{split}"] = np.stack(images).astype(np.uint8)
        out[f"y_{split}"] = np.array([label for label, _, _ in items], dtype=np.int64)
    return out
