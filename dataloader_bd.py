"""Poisoned training set and clean / backdoor test sets (SPEC section 1).

Images stay uint8 (N, 3, H, W) tensors in memory; every training sample is
``(image, label, gt_label, is_clean)``. Poisoning is vectorised: the poisoned indices are drawn
once from ``--seed`` and the trigger is applied to all of them in one batched call.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.errors import UserError
from utils.triggers import TriggerContext, apply_trigger

SYNTHETIC_SEED = 20221128  # the synthetic dataset is the same for every --seed


@dataclass
class PoisonedTrainSet:
    images: torch.Tensor       # uint8 (N, 3, H, W), poisoned where is_clean is False
    labels: torch.Tensor       # int64 (N,), the (possibly poisoned) training labels
    gt_labels: torch.Tensor    # int64 (N,), the true classes
    is_clean: torch.Tensor     # bool (N,)
    poison_indices: np.ndarray

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i], self.gt_labels[i], self.is_clean[i]


@dataclass
class TestSets:
    clean_images: torch.Tensor  # the whole test split
    clean_labels: torch.Tensor
    bd_images: torch.Tensor     # triggered test images (target class excluded for all2one/cleanLabel)
    bd_targets: torch.Tensor    # the attack's target label of each backdoor test image
    bd_gt_labels: torch.Tensor  # their true classes (for R-ACC)
    bd_source: torch.Tensor     # their positions in the clean split (ASR0 reuses the clean forward pass)

    @property
    def bd_clean_images(self):
        """The backdoor test images without trigger (for the base rate ASR0)."""
        return self.clean_images[self.bd_source]


# ----------------------------------------------------------------------------------- raw data
def make_synthetic(n_train=2000, n_test=500, num_classes=10, size=32):
    """A small learnable 10-class 32x32 dataset generated in code: each class is a smooth random
    colour layout; samples are shifted, turned (one of the 8 right-angle rotations and flips), re-lit,
    noisy copies of it. The turns make a class, as in photos, something a rotation keeps, while a
    trigger keeps its one orientation: the property FCT relies on."""
    rng = np.random.default_rng(SYNTHETIC_SEED)
    coarse = torch.from_numpy(rng.uniform(30, 225, (num_classes, 3, 4, 4)).astype(np.float32))
    protos = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def sample(n):
        y = np.arange(n) % num_classes
        rng.shuffle(y)
        x = protos[y].clone()
        shifts = rng.integers(-3, 4, (n, 2))
        for s in np.unique(shifts, axis=0):  # a handful of distinct shifts, not a per-image loop
            idx = np.where((shifts == s).all(1))[0]
            x[idx] = torch.roll(x[idx], shifts=(int(s[0]), int(s[1])), dims=(2, 3))
        turns = rng.integers(0, 8, n)
        for k in range(8):  # one batched call per turn of the dihedral group
            idx = np.where(turns == k)[0]
            x[idx] = torch.rot90(x[idx], k % 4, dims=(2, 3))
            if k >= 4:
                x[idx] = x[idx].flip(3)
        # a faint grating of random orientation, period and phase on every image, whatever its class:
        # edges and stripes of all orientations, as photos have, so that only the trigger's own
        # orientation and period stand out
        theta, period = rng.uniform(0, np.pi, (n, 1, 1)), rng.uniform(4, 12, (n, 1, 1))
        phase, amplitude = rng.uniform(0, 2 * np.pi, (n, 1, 1)), rng.uniform(0, 30, (n, 1, 1))
        yy, xx = np.mgrid[0:size, 0:size]
        grating = amplitude * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)
        x = x + torch.from_numpy(grating.astype(np.float32))[:, None]
        x = x * torch.from_numpy(rng.uniform(0.7, 1.3, (n, 1, 1, 1)).astype(np.float32))
        x = x + torch.from_numpy(rng.normal(0, 20, x.shape).astype(np.float32))
        return x.clamp(0, 255).round().to(torch.uint8), torch.from_numpy(y.astype(np.int64))

    x_train, y_train = sample(n_train)
    x_test, y_test = sample(n_test)
    return x_train, y_train, x_test, y_test


def _check_arrays(x, y, name, info, source):
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise UserError(f"{source}: {name} must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
    if len(x) == 0:
        raise UserError(f"{source}: {name} holds no images")
    if x.shape[1:3] != (info.image_size, info.image_size):
        raise UserError(f"{source}: images are {x.shape[1]}x{x.shape[2]}, but --dataset expects "
                        f"{info.image_size}x{info.image_size}")
    y_name = "y" + name[1:]
    if not (np.issubdtype(y.dtype, np.integer) and y.dtype != np.uint64):
        raise UserError(f"{source}: {y_name} must hold integer class labels, got {y.dtype}")
    if y.ndim != 1 or len(y) != len(x):
        raise UserError(f"{source}: {y_name} does not match {name} ({y.shape} labels for {len(x)} images)")
    if y.min() < 0 or y.max() >= info.num_classes:
        raise UserError(f"{source}: {y_name} has labels outside 0..{info.num_classes - 1}; is --dataset right?")


def load_npz(path, info):
    path = Path(path)
    if not path.exists():
        raise UserError(f"--data_file {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise UserError(f"--data_file {path} is not a readable .npz ({err.__class__.__name__})") from None
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(data.files)
    if missing:
        raise UserError(f"--data_file {path} lacks the arrays {', '.join(sorted(missing))}")
    try:
        arrays = {k: data[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except Exception as err:  # noqa: BLE001 - object (pickled) arrays are refused, truncated members too
        raise UserError(f"--data_file {path}: cannot read its arrays ({err.__class__.__name__}); it must hold "
                        "plain uint8 images and integer labels") from None
    for split in ("train", "test"):
        _check_arrays(arrays[f"x_{split}"], arrays[f"y_{split}"], f"x_{split}", info, path)
    to_t = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
    return (to_t(arrays["x_train"]), torch.from_numpy(arrays["y_train"].astype(np.int64)),
            to_t(arrays["x_test"]), torch.from_numpy(arrays["y_test"].astype(np.int64)))


def _load_cifar(args):
    import torchvision
    cls = torchvision.datasets.CIFAR10 if args.dataset == "cifar10" else torchvision.datasets.CIFAR100
    out = []
    for train in (True, False):
        try:
            ds = cls(args.data_root, train=train, download=True)
        except Exception as err:  # noqa: BLE001 - no network or a broken archive
            raise UserError(f"{args.dataset} is not in {args.data_root} and could not be downloaded "
                            f"({err.__class__.__name__}); pass --data_file X.npz instead") from None
        out += [torch.from_numpy(ds.data.transpose(0, 3, 1, 2).copy()), torch.tensor(ds.targets)]
    return tuple(out)


def _load_image_folder(args, size):
    import torchvision
    from torchvision.transforms import v2
    root = Path(args.data_root)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise UserError(f"the ImageNet subset needs {root}/train and {root}/val (ImageFolder layout)")
    tf = v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True)])
    out = []
    for split in ("train", "val"):
        ds = torchvision.datasets.ImageFolder(root / split, transform=tf)
        loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=args.num_workers)
        xs, ys = zip(*loader)
        out += [torch.cat(xs), torch.cat(ys)]
    return tuple(out)


def load_raw(args):
    """Clean (x_train, y_train, x_test, y_test): uint8 (N, 3, H, W) and int64 labels."""
    from utils.args import dataset_info
    info = dataset_info(args)
    if args.data_file:
        from utils.image_folder import cached_arrays, is_image_folder
        path = cached_arrays(args.data_file, args.data_root) if is_image_folder(args.data_file) else args.data_file
        return load_npz(path, info)
    if args.dataset == "synthetic":
        return make_synthetic()
    if args.dataset == "imagenet":
        return _load_image_folder(args, info.image_size)
    return _load_cifar(args)


# ----------------------------------------------------------------------------------- poisoning
def _floor(x):
    return math.floor(round(x, 9))  # 0.1 * 4650 must be 465, not 464.999...


def select_poison_indices(labels, target_type, target, rate, num_classes, seed):
    """SPEC section 1: which training samples are poisoned (sorted, reproducible from the seed)."""
    labels = np.asarray(labels)
    if target_type == "all2one":
        candidates = np.flatnonzero(labels != target)
    elif target_type == "all2all":
        candidates = np.arange(len(labels))
    elif target_type == "cleanLabel":
        candidates = np.flatnonzero(labels == target)
    else:
        raise UserError(f"unknown target type '{target_type}'")
    n = _floor(rate * len(candidates))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=n, replace=False))


def attack_labels(labels, target_type, target, num_classes):
    """The label each (poisoned) sample is given: t, (y + 1) mod C, or unchanged (clean label)."""
    if target_type == "all2one":
        return torch.full_like(labels, target)
    if target_type == "all2all":
        return (labels + 1) % num_classes
    return labels.clone()


def _trigger_device(args):
    """Where a network-based trigger (SSBA's encoder) runs: the run's device."""
    if getattr(args, "device", None) is None:
        return torch.device("cpu")
    from utils.args import resolve_device
    return resolve_device(args)


def build_datasets(args, clean_model=None, raw=None, poison=True):
    """The poisoned training set and the test sets of ``args``' attack.

    clean_model: the clean network the CL attack (fourCornerTrigger) perturbs its images against.
    raw: optional pre-loaded ``load_raw(args)`` output.
    poison=False: the clean training set (for the clean model of CL), with the same test sets.
    """
    x_train, y_train, x_test, y_test = raw if raw is not None else load_raw(args)
    C, t = args.num_classes, args.target_label
    poison_idx = (select_poison_indices(y_train.numpy(), args.target_type, t, args.poison_rate, C, args.seed)
                  if poison else np.zeros(0, dtype=np.int64))
    idx = torch.from_numpy(poison_idx)
    ctx = TriggerContext(blend_image=getattr(args, "blend_image", None), pgd_model=clean_model,
                         pgd_labels=y_train[idx], ssba_encoder=getattr(args, "ssba_encoder", None),
                         dataset=args.dataset, device=_trigger_device(args))
    images, labels = x_train.clone(), y_train.clone()
    if len(idx):
        images[idx] = apply_trigger(args.trigger_type, x_train[idx], "train", ctx)
        labels[idx] = attack_labels(y_train[idx], args.target_type, t, C)
    is_clean = torch.ones(len(y_train), dtype=torch.bool)
    is_clean[idx] = False
    train = PoisonedTrainSet(images, labels, y_train.clone(), is_clean, poison_idx)

    keep = torch.ones_like(y_test, dtype=torch.bool) if args.target_type == "all2all" else y_test != t
    # the test-time target: t for all2one and cleanLabel, (y + 1) mod C for all2all
    bd_targets = attack_labels(y_test[keep], "all2all" if args.target_type == "all2all" else "all2one", t, C)
    tests = TestSets(x_test, y_test, apply_trigger(args.trigger_type, x_test[keep], "test", ctx),
                     bd_targets, y_test[keep], torch.nonzero(keep).flatten())
    return train, tests
