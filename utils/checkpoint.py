"""Self-describing checkpoints: weights plus the arguments that made them.

Saved atomically (write to a temporary file, then rename) and loaded with ``weights_only=True``
and strict keys, so a checkpoint from another dataset, model, width or attack is refused with a
one-line error instead of being half-loaded.
"""
from pathlib import Path

import torch

from models import build_model
from utils.args import describe_args
from utils.errors import UserError
from utils.files import atomic_write
from utils.paths import dataset_tag

# what must agree between a checkpoint and the run that loads it
MODEL_KEYS = ("dataset", "model", "width")
ATTACK_KEYS = ("data_tag", "poison_rate", "target_type", "target_label", "trigger_type", "seed", "trigger_asset")


def run_meta(args):
    """The arguments as saved beside every output (checkpoints, splits, FCT settings), with the data tag."""
    return {**describe_args(args), "data_tag": dataset_tag(args)}


def save_checkpoint(path, args, model, optimizer=None, scheduler=None, epoch=None, **extra):
    path = Path(path)
    meta = run_meta(args)
    state = {"model": model.state_dict(), "epoch": epoch, "args": meta, **extra}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path):
    path = Path(path) if path else None
    if path is None or not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - anything unreadable is the user's input problem
        raise UserError(f"{path} is not a checkpoint of this project ({err.__class__.__name__})") from None


def check_compatible(ckpt, args, keys, path="checkpoint"):
    """Raise a UserError naming the first setting in which checkpoint and run disagree."""
    saved = ckpt.get("args", {})
    current = run_meta(args)
    for key in keys:
        if key in saved and key in current and saved[key] != current[key]:
            raise UserError(mismatch_message(path, key, saved[key], current[key]))


def mismatch_message(source, key, saved, current):
    """One line saying in which setting an earlier output (checkpoint, split) and this run disagree."""
    if key == "trigger_asset":
        return (f"{source} was made with another trigger file (fingerprint {saved or 'none'}, now "
                f"{current or 'none'}: the blend image, stripe, Trojan patch or SSBA encoder changed); "
                "make it again with the current file (--overwrite) or restore the old file")
    return f"{source} was made with --{key} {saved}, but this run has --{key} {current}"


def load_weights(model, ckpt, path="checkpoint"):
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, KeyError) as err:
        first = str(err).splitlines()[0][:200]
        raise UserError(f"{path} does not fit the model of this run: {first}") from None
    return model


def model_from_checkpoint(path, num_classes=None, maxpool=True):
    """Rebuild the network a checkpoint describes and load its weights (nanoGPT style)."""
    ckpt = read_checkpoint(path)
    a = ckpt["args"]
    n = a["num_classes"] if num_classes is None else num_classes
    model = build_model(a["model"], n, a["mean"], a["std"], a["width"], maxpool, a["dataset"] == "imagenet")
    return load_weights(model, ckpt, path), ckpt
