"""What ST/train_extractor.py, ST/train_classifier.py and ST/test.py share: their flags, run
folders, start/resume rule, training data and checkpoints. The maths is in utils/supcon.py."""
from pathlib import Path
from types import SimpleNamespace

import torch

from utils.args import nonneg_float, positive_float, validate_args
from utils.checkpoint import ATTACK_KEYS, MODEL_KEYS, check_compatible, load_weights, read_checkpoint
from utils.errors import UserError
from utils.paths import attack_tag, split_dir, st_dir
from utils.supcon import PROJECTION_DIM, FrozenEncoderClassifier, SupConNet, build_encoder, weights_fingerprint
from utils.train import start_checkpoint

# the paper's extractor recipe (SPEC 4.1): also what train_classifier.py / test.py look for by default
EXTRACTOR_DEFAULTS = {"lr": 0.5, "weight_decay": 1e-4, "batch_size": 512, "temp": 0.1}
EXTRACTOR_KIND, CLASSIFIER_KIND = "st_extractor", "st_classifier"
ST_KEYS = ("undefended", "clean_ratio", "poison_ratio")  # must also agree between the ST steps


# ----------------------------------------------------------------------------------- args, folders
def add_st_flags(parser, script):
    """Flags shared by the three ST scripts."""
    g = parser.add_argument_group("D-ST")
    g.add_argument("--undefended", action="store_true",
                   help="baseline without defence: trust every training sample (plain SupCon on the whole "
                        "poisoned set, plain cross-entropy classifier); outputs in <attack>_undefended/")
    g.add_argument("--st_root", default=None,
                   help="root of the D-ST outputs (default: <save_root>/ST_save, with paper-readme's ST/save "
                        "layout inside)")
    if script != "extractor":
        g.add_argument("--temp", type=positive_float, default=EXTRACTOR_DEFAULTS["temp"],
                       help="temperature of the extractor run to look for when no checkpoint is given")
    return g


def add_classifier_recipe_flags(g):
    """The classifier's recipe flags (they name its run folder, so ST/test.py takes them too to find it)."""
    g.add_argument("--lambda_p", type=nonneg_float, default=0.001,
                   help="lambda: weight of -CE(D_p) (>= 0: a negative value would train on the detected poisoned labels)")
    # improvements beyond the paper, off by default
    g.add_argument("--normalize_features", action="store_true",
                   help="[not in the paper] L2-normalise the features before the linear layer")
    g.add_argument("--warm_epochs", type=nonneg_float, default=0,
                   help="[not in the paper] linear lr warm-up from --warmup_from over this many epochs")
    g.add_argument("--warmup_from", type=positive_float, default=0.01)
    g.add_argument("--cosine", action="store_true",
                   help="[not in the paper] cosine decay of the lr to lr x 0.001 over the run (after the warm-up): "
                        "a stable last epoch, which is the one kept")
    g.add_argument("--balance_classes", action="store_true",
                   help="[not in the paper] weight CE(D_c) by inverse class frequency in D_c: the FCT split "
                        "over-represents the target class in D_c, which the linear layer would learn as a prior")


def prepare_args(args):
    """validate_args plus the ST rule for relative --save_root: run from a checkout's ST/ folder (as
    paper-readme's `cd ST` does), a relative --save_root is taken from that checkout's root, so the
    default ./saved finds the split that the SD scripts wrote from the root; from anywhere else it
    is relative to the current folder, as in every other script. The checkout is the one whose ST/
    is the current folder, not the one the shared code was installed from."""
    root, cwd = Path(args.save_root), Path.cwd().resolve()
    if not root.is_absolute() and cwd.name == "ST" and (cwd / "train_extractor.py").is_file():
        args.save_root = str((cwd.parent / root).resolve())
    validate_args(args)
    if args.dataset == "imagenet":
        raise UserError("D-ST is defined for the 32x32 datasets (cifar10, cifar100); the paper runs only "
                        "D-BR on the ImageNet subset")
    return args


def st_run_root(args):
    """<st_root>/poison_rate_<p>/SupCon_models/<data>/<model>/<attack>_<ac>_<ap>, or
    .../<attack>_undefended for the undefended baseline (which uses no split)."""
    return undefended_dir(args) if args.undefended else st_dir(args)


def undefended_dir(args):
    """The undefended baseline's run root, beside D-ST's (the same attack, data and model flags)."""
    return st_dir(args).with_name(f"{attack_tag(args)}_undefended")


def _num(x):
    return f"{float(x):g}"


def extractor_dir(args, lr=None, weight_decay=None, batch_size=None, temp=None):
    """The extractor's run folder, named as in paper-readme (SupContrast's naming)."""
    lr = args.lr if lr is None else lr
    weight_decay = args.weight_decay if weight_decay is None else weight_decay
    batch_size = args.batch_size if batch_size is None else batch_size
    temp = args.temp if temp is None else temp
    return st_run_root(args) / (f"SupCon_{args.dataset}_{args.model}_lr_{float(lr)}_decay_{_num(weight_decay)}"
                                f"_bsz_{batch_size}_temp_{float(temp)}_trial_0_cosine_warm")


def default_extractor(args):
    """last.pth of the paper-recipe extractor run with this run's data, model and attack flags."""
    d = EXTRACTOR_DEFAULTS
    return extractor_dir(args, d["lr"], d["weight_decay"], d["batch_size"], args.temp) / "last.pth"


def classifier_dir(args):
    """The classifier's run folder, named as in paper-readme; the opt-in changes to the paper's
    recipe add a suffix (_norm, _bal, _cos, _warm<E>, _lam<lambda>) so that they never share a folder."""
    extra = "".join(s for s, on in (("_norm", getattr(args, "normalize_features", False)),
                                     ("_cos", getattr(args, "cosine", False)),
                                     ("_bal", getattr(args, "balance_classes", False)),
                                     (f"_warm{_num(getattr(args, 'warm_epochs', 0))}", getattr(args, "warm_epochs", 0)),
                                     (f"_lam{_num(getattr(args, 'lambda_p', 0.001))}",
                                      getattr(args, "lambda_p", 0.001) != 0.001)) if on)
    return st_run_root(args) / (f"Linear_{args.dataset}_{args.model}_lr_{float(args.lr)}"
                                f"_decay_{_num(args.weight_decay)}_bsz_{args.batch_size}{extra}")


def start_run(args, run_dir):
    """The project's start rule (utils.train.start_checkpoint) for an ST folder, whose run is its
    last.pth: --resume (extractor) or --overwrite, then the folder is locked for this process.
    Returns the checkpoint to resume from, or None."""
    ckpt, resumed = start_checkpoint(args, run_dir, newest=_last_pth, made=("*.pth", "log.csv"))
    return ckpt if resumed else None


def _last_pth(run_dir):
    last = Path(run_dir) / "last.pth"
    return last if last.exists() else None


# ----------------------------------------------------------------------------------- data
def load_st_sets(args, rt, names=("clean", "poison", "suspicious")):
    """Training data of an ST step, on the device: images uint8 (N, 3, H, W), labels, and per sample
    ``trusted`` (in D_c), ``in_poison_set`` (in D_p), plus ground truth ``is_poisoned`` (reports only).

    Defended: the union of the named sets of the SD split (utils.split). Undefended: the whole
    poisoned training set, every sample trusted. Also returns the test sets and a one-line summary.
    """
    from utils.split import SET_NAMES, load_split
    from utils.train import load_attack_data
    train_set, tests = load_attack_data(args, rt)
    if args.undefended:
        n = len(train_set)
        data = SimpleNamespace(images=train_set.images, labels=train_set.labels,
                               trusted=torch.ones(n, dtype=torch.bool), in_poison_set=torch.zeros(n, dtype=torch.bool),
                               is_poisoned=~train_set.is_clean)
        summary = f"undefended: all {n} training samples trusted ({int(data.is_poisoned.sum())} truly poisoned)"
    else:
        folder = split_dir(args)
        split = load_split(folder, args)
        parts = [split[k] for k in names]
        data = SimpleNamespace(
            images=torch.cat([p["images"] for p in parts]), labels=torch.cat([p["labels"] for p in parts]),
            trusted=torch.cat([torch.full((len(p["labels"]),), k == "clean") for k, p in zip(names, parts)]),
            in_poison_set=torch.cat([torch.full((len(p["labels"]),), k == "poison") for k, p in zip(names, parts)]),
            is_poisoned=torch.cat([p["is_poisoned"] for p in parts]))
        if len(data.labels) == 0:
            raise UserError(f"the split in {folder} has no samples in {', '.join(names)}")
        summary = f"split {folder}: " + "; ".join(
            f"{SET_NAMES[k]} {len(split[k]['labels'])} ({100.0 * split[k]['is_poisoned'].float().mean().item():.1f}% "
            "truly poisoned)" if len(split[k]["labels"]) else f"{SET_NAMES[k]} 0" for k in SET_NAMES)
    for k in ("images", "labels", "trusted", "in_poison_set"):
        setattr(data, k, rt.place(getattr(data, k)))
    return data, tests, summary


# ----------------------------------------------------------------------------------- checkpoints
def _read_st_checkpoint(path, args, kind, missing):
    """The checkpoint at ``path``: it must exist (else UserError ``missing``), be of ``kind`` and agree with
    this run's data/model/attack/ST settings."""
    if not Path(path).is_file():
        raise UserError(missing)
    ckpt = read_checkpoint(path)
    if ckpt.get("kind") != kind:
        what = {EXTRACTOR_KIND: "a D-ST feature extractor (ST/train_extractor.py)",
                CLASSIFIER_KIND: "a D-ST classifier (ST/train_classifier.py)"}[kind]
        raise UserError(f"{path} is not {what}")
    check_compatible(ckpt, args, MODEL_KEYS + ATTACK_KEYS + ST_KEYS, path)
    return ckpt


def load_extractor(path, args):
    """The SupConNet saved at path, checked against this run's data/model/attack/ST settings (strict)."""
    ckpt = _read_st_checkpoint(path, args, EXTRACTOR_KIND,
                               f"no feature extractor at {path}; run ST/train_extractor.py with the same flags "
                               "first, or name the checkpoint (--ckpt / --model_ckpt)")
    model = SupConNet(build_encoder(ckpt["args"]), ckpt.get("projection_dim", PROJECTION_DIM))
    return load_weights(model, ckpt, path), ckpt


def load_classifier(path, args, encoder):
    """The linear layer saved at path on top of ``encoder`` (which must be the one it was trained on)."""
    ckpt = _read_st_checkpoint(path, args, CLASSIFIER_KIND,
                               f"no classifier at {path}; run ST/train_classifier.py with the same flags first, "
                               "or name it with --classifier_ckpt")
    model = FrozenEncoderClassifier(encoder, ckpt["args"]["num_classes"], ckpt["args"].get("normalize_features", False))
    load_weights(model.linear, ckpt, path)
    if ckpt.get("encoder_fingerprint") not in (None, weights_fingerprint(encoder)):
        raise UserError(f"{path} was trained on another feature extractor ({ckpt.get('extractor')}); "
                        "pass the --model_ckpt it was trained with")
    return model, ckpt
