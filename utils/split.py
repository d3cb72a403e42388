"""The hand-off files of the SD module: the three separated sets and the split report.

A split folder (utils.paths.split_dir) holds, for each set name in SET_NAMES:
  <name>_samples.npy      uint8 (n, H, W, 3) images (HWC, as the data files)
  <name>_labels.npy       int64 (n,) training labels (possibly poisoned)
  <name>_gt_labels.npy    int64 (n,) true classes (ground truth, for reports only)
  <name>_is_poisoned.npy  bool (n,) ground truth: was this sample poisoned (for reports only)
  <name>_indices.npy      int64 (n,) indices into the training set
plus split_report.json (quality against the ground truth; written last, so a split without it is
incomplete) and split_meta.json (the arguments, written first).
Everything loads with np.load(allow_pickle=False).
"""
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.files import read_json, read_npy, save_json, save_npy

SET_NAMES = {"clean": "D_c", "poison": "D_p", "suspicious": "D_u"}
META_KEYS = ("dataset", "data_tag", "poison_rate", "target_type", "target_label", "trigger_type", "seed",
             "trigger_asset")


def save_split(folder, train_set, index_sets, report, meta):
    """index_sets: {"clean": idx, "poison": idx, "suspicious": idx} over the training set."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = train_set.images.permute(0, 2, 3, 1).numpy()
    (folder / "split_report.json").unlink(missing_ok=True)  # the split is incomplete until it is back
    save_json(folder / "split_meta.json", meta)  # the settings stamp first (see separate_samples.py)
    for name, idx in index_sets.items():
        idx = np.asarray(idx, dtype=np.int64)
        save_npy(folder / f"{name}_samples.npy", images[idx])
        save_npy(folder / f"{name}_labels.npy", train_set.labels.numpy()[idx])
        save_npy(folder / f"{name}_gt_labels.npy", train_set.gt_labels.numpy()[idx])
        save_npy(folder / f"{name}_is_poisoned.npy", ~train_set.is_clean.numpy()[idx])
        save_npy(folder / f"{name}_indices.npy", idx)
    save_json(folder / "split_report.json", report)  # last: a split with a report is complete


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
    meta = read_json(meta_path, "the split's settings")
    if not (folder / "split_report.json").exists():
        raise UserError(f"the split in {folder} is incomplete (separate_samples.py was interrupted); run it again")
    if args is not None:
        from utils.checkpoint import mismatch_message, run_meta
        current = run_meta(args)
        for key in META_KEYS:
            if key in current and meta.get(key) != current[key]:
                raise UserError(mismatch_message(f"the split in {folder}", key, meta.get(key), current[key]))
    out = {}
    for name in SET_NAMES:
        arrays = {suffix: read_npy(folder / f"{name}_{suffix}.npy", "the split file")
                  for suffix in ("samples", "labels", "gt_labels", "is_poisoned", "indices")}
        if arrays["samples"].ndim != 4 or len({len(a) for a in arrays.values()}) != 1:
            raise UserError(f"the split files of {SET_NAMES[name]} in {folder} disagree in length; "
                            "run separate_samples.py again (--overwrite)")
        out[name] = {"images": torch.from_numpy(np.ascontiguousarray(arrays.pop("samples").transpose(0, 3, 1, 2))),
                     **{k: torch.from_numpy(v) for k, v in arrays.items()}}
    return out
