"""The hand-off files of the SD module: the three separated sets and the split report.

A split folder (utils.paths.split_dir) holds, for each set name in SET_NAMES:
  <name>_samples.npy      uint8 (n, H, W, 3) images (HWC, as the data files)
  <name>_labels.npy       int64 (n,) training labels (possibly poisoned)
  <name>_gt_labels.npy    int64 (n,) true classes (ground truth, for reports only)
  <name>_is_poisoned.npy  bool (n,) ground truth: was this sample poisoned (for reports only)
  <name>_indices.npy      int64 (n,) indices into the training set
plus split_report.json (quality against the ground truth) and split_meta.json (the arguments).
Everything loads with np.load(allow_pickle=False).
"""
import json
from pathlib import Path

import numpy as np

from utils.errors import UserError

SET_NAMES = {"clean": "D_c", "poison": "D_p", "suspicious": "D_u"}
META_KEYS = ("dataset", "data_tag", "poison_rate", "target_type", "target_label", "trigger_type", "seed",
             "trigger_asset")


def save_split(folder, train_set, index_sets, report, meta):
    """index_sets: {"clean": idx, "poison": idx, "suspicious": idx} over the training set."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = train_set.images.permute(0, 2, 3, 1).numpy()
    for name, idx in index_sets.items():
        idx = np.asarray(idx, dtype=np.int64)
        np.save(folder / f"{name}_samples.npy", images[idx])
        np.save(folder / f"{name}_labels.npy", train_set.labels.numpy()[idx])
        np.save(folder / f"{name}_gt_labels.npy", train_set.gt_labels.numpy()[idx])
        np.save(folder / f"{name}_is_poisoned.npy", ~train_set.is_clean.numpy()[idx])
        np.save(folder / f"{name}_indices.npy", idx)
    (folder / "split_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "split_meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_split(folder, args=None):
    """{name: dict(images uint8 (n,3,H,W) tensor, labels, gt_labels, is_poisoned, indices)}.

    With args, checks that dataset, data file, attack, poison rate and seed match (UserError if not).
    """
    import torch
    folder = Path(folder)
    meta_path = folder / "split_meta.json"
    if not meta_path.exists():
        raise UserError(f"no separated samples in {folder}; run separate_samples.py first "
                        "(same --dataset/--data_file/--trigger_type/--poison_rate/--seed and --sd_width)")
    meta = json.loads(meta_path.read_text())
    if args is not None:
        from utils.args import describe_args
        from utils.paths import dataset_tag
        current = describe_args(args)
        current["data_tag"] = dataset_tag(args)
        from utils.checkpoint import mismatch_message
        for key in META_KEYS:
            if key == "trigger_asset" and key not in meta:
                continue  # a split made before trigger files were fingerprinted
            if key in current and meta.get(key) != current[key]:
                raise UserError(mismatch_message(f"the split in {folder}", key, meta.get(key), current[key]))
    out = {}
    for name in SET_NAMES:
        load = lambda suffix: np.load(folder / f"{name}_{suffix}.npy", allow_pickle=False)  # noqa: E731
        out[name] = {"images": torch.from_numpy(np.ascontiguousarray(load("samples").transpose(0, 3, 1, 2))),
                     "labels": torch.from_numpy(load("labels")), "gt_labels": torch.from_numpy(load("gt_labels")),
                     "is_poisoned": torch.from_numpy(load("is_poisoned")), "indices": torch.from_numpy(load("indices"))}
    return out
