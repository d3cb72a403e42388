"""D-ST (SPEC section 4): the semi-supervised contrastive loss, the mixed cross-entropy, the
encoder + projection head, the frozen-encoder classifier, and what ST/train_extractor.py,
ST/train_classifier.py and ST/test.py share (data, folders, checkpoints, the one ST epoch loop).

Symbols follow the paper: D_c (clean_set, trusted labels), D_p (poison_set), D_u (suspicious_set).
"""
import hashlib
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import build_model
from utils.args import nonneg_float, positive_float, validate_args
from utils.augment import supcon_view
from utils.checkpoint import ATTACK_KEYS, MODEL_KEYS, check_compatible, load_weights, read_checkpoint
from utils.errors import UserError
from utils.files import lock_folder
from utils.logger import progress
from utils.paths import attack_tag, split_dir, st_dir
from utils.train import batch_indices

# the paper's extractor recipe (SPEC 4.1): also what train_classifier.py / test.py look for by default
EXTRACTOR_DEFAULTS = {"lr": 0.5, "weight_decay": 1e-4, "batch_size": 512, "temp": 0.1}
PROJECTION_DIM = 128
BASE_TEMPERATURE = 0.07  # SupContrast scales its loss by T / 0.07; kept so that lr 0.5 means the same step
EXTRACTOR_KIND, CLASSIFIER_KIND = "st_extractor", "st_classifier"
ST_KEYS = ("undefended", "clean_ratio", "poison_ratio")  # must also agree between the ST steps


# ----------------------------------------------------------------------------------- losses
def positive_mask(labels, trusted, n_views=2):
    """Which pairs of the V*B views are positives (bool (V*B, V*B), view-major, diagonal False).

    Two views are positives if they come from the same image, or if both images are in D_c
    (trusted) and share a label. A D_p / D_u image (trusted False) therefore has exactly one
    positive per other view (its own), and a D_c anchor never counts a D_p / D_u view as positive:
    the paper's rule. (The original code masked only the anchor rows.)
    """
    b = len(labels)
    sample = torch.arange(b, device=labels.device).repeat(n_views)
    y, t = labels.repeat(n_views), trusted.repeat(n_views)
    pos = (sample[:, None] == sample[None, :]) | ((y[:, None] == y[None, :]) & t[:, None] & t[None, :])
    return pos.fill_diagonal_(False)


def semi_supcon_loss(features, labels, trusted, temperature=0.1, base_temperature=BASE_TEMPERATURE):
    """Semi-supervised contrastive loss of D-ST (SPEC 4.1).

    features: (B, V, D) L2-normalised projections, V views of each of the B images;
    labels: (B,) training labels (only those of trusted images are used); trusted: (B,) bool, the
    image is in D_c. For every anchor view i (all V*B views are anchors):
        l_i = -(T / T_base) * mean_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T) )
    with P(i) from ``positive_mask``. Every trusted -> SupCon; none trusted -> SimCLR (NT-Xent).
    Returns the mean of l_i over the V*B anchors (a scalar, float32).
    """
    b, v, _ = features.shape
    z = features.float().transpose(0, 1).reshape(v * b, -1)
    logits = z @ z.T / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()  # numerical stability only
    self_pair = torch.eye(v * b, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pair, float("-inf"))          # an anchor is not its own contrast
    log_prob = logits - torch.logsumexp(logits, 1, keepdim=True)
    pos = positive_mask(labels, trusted, v)
    mean_log_prob_pos = log_prob.masked_fill(~pos, 0.0).sum(1) / pos.sum(1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def mixed_cross_entropy(logits, labels, is_poison, lam=0.001, class_weight=None):
    """SPEC 4.2: CE(D_c) - lam * CE(D_p), each CE the mean over the batch samples of its set.

    logits (B, C), labels (B,), is_poison (B,) bool (the sample is in D_p). A set absent from
    the batch contributes 0 (never NaN). With no D_p at all this is the plain cross-entropy.
    class_weight (C,), optional: CE(D_c) becomes the class-weighted mean (F.cross_entropy's weight).
    """
    zero = logits.sum() * 0.0  # keeps the graph and the dtype
    clean = ~is_poison
    ce_clean = F.cross_entropy(logits[clean], labels[clean], weight=class_weight) if clean.any() else zero
    ce_poison = F.cross_entropy(logits[is_poison], labels[is_poison]) if is_poison.any() else zero
    return ce_clean - lam * ce_poison


def balanced_class_weights(labels, num_classes):
    """w_k = n / (K_present * n_k) for the classes present in ``labels`` (0 for absent ones), so that
    every class weighs the same in CE(D_c) whatever its share of D_c."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * (counts > 0).sum()), torch.zeros_like(counts))
    return w


# ----------------------------------------------------------------------------------- networks
class SupConNet(nn.Module):
    """Encoder (CIFAR ResNet without max-pool) + projection head Linear(d,d)-ReLU-Linear(d,128).

    forward: images (B, 3, H, W) in [0, 1] -> L2-normalised projections (B, 128), float32;
    features: -> the pooled encoder features (B, d), what the classifier sees.
    """

    def __init__(self, encoder, projection_dim=PROJECTION_DIM):
        super().__init__()
        self.encoder = encoder
        d = encoder.feature_dim
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, projection_dim))

    def features(self, x):
        return self.encoder.features(x)

    def forward(self, x):
        return F.normalize(self.head(self.features(x)).float(), dim=1)


class FrozenEncoderClassifier(nn.Module):
    """The D-ST model: a frozen encoder (eval mode, no gradients) and a trainable linear layer.

    forward: images -> logits (B, C) (the interface utils.train.evaluate expects).
    normalize=True (an opt-in improvement) feeds L2-normalised features to the linear layer.
    """

    def __init__(self, encoder, num_classes, normalize=False):
        super().__init__()
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.linear = nn.Linear(encoder.feature_dim, num_classes)
        self.normalize = normalize

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()  # BN statistics of the frozen encoder never move
        return self

    def features(self, x):
        f = self.encoder.features(x)
        return F.normalize(f.float(), dim=1) if self.normalize else f

    def forward(self, x):
        return self.linear(self.features(x))


def build_encoder(meta):
    """The D-ST encoder described by a dict of args (a checkpoint's, or describe_args of a run)."""
    return build_model(meta["model"], 0, meta["mean"], meta["std"], meta["width"], maxpool=False,
                       imagenet=meta["dataset"] == "imagenet")


def weights_fingerprint(module):
    """A short hash of a module's state (weights and BN buffers), to tie a classifier to its encoder."""
    h = hashlib.sha256()
    for k, t in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------- schedule
def warmup_cosine_lr(epoch, epochs, base_lr, warm_epochs=10, warmup_from=0.01, min_ratio=0.001):
    """lr at a (fractional) epoch: linear warm-up from ``warmup_from`` to ``base_lr`` over
    ``warm_epochs``, then a half cosine from ``base_lr`` down to ``base_lr * min_ratio`` at ``epochs``.
    Evaluated every step (SupContrast changes the cosine once per epoch; same curve, smoother)."""
    eta_min = base_lr * min_ratio
    if epoch < warm_epochs:
        return warmup_from + (base_lr - warmup_from) * epoch / warm_epochs
    progress = min((epoch - warm_epochs) / max(epochs - warm_epochs, 1e-8), 1.0)
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * progress)) / 2


def run_epoch(model, n, batch_size, g, step, optimizer, lr_at, epoch, desc="train", clock=time.time):
    """The one ST training pass: seeded batches over n samples; ``step(idx) -> (loss, counts)``
    computes a batch's loss (counts: a dict of numbers to sum, may be empty); ``lr_at(t)`` gives the
    lr at fractional epoch t. Returns a dict: the sample-weighted mean loss, the summed counts, the
    last lr, the seconds (by ``clock``) of the pass and of its first batch (which carries the kernel
    warm-up)."""
    model.train()
    t0 = clock()
    batches = batch_indices(n, batch_size, g)
    loss_sum, sums, lr, first = 0.0, {}, None, None
    for i, idx in enumerate(progress(batches, desc)):
        lr = lr_at(epoch + i / len(batches))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, counts = step(idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(idx)  # .item() also waits for the device: honest timings
        for k, v in counts.items():
            sums[k] = sums.get(k, 0) + v
        first = clock() - t0 if first is None else first
    return {"loss": loss_sum / max(n, 1), "counts": sums, "lr": lr, "seconds": clock() - t0,
            "first_batch_seconds": first or 0.0, "batches": len(batches)}


def two_views(x, g):
    """Two SupCon views of each image, batched: (2B, 3, H, W), view-major, channels-last."""
    return supcon_view(torch.cat([x, x]), g).contiguous(memory_format=torch.channels_last)


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
    d = st_dir(args)
    return d.with_name(f"{attack_tag(args)}_undefended") if args.undefended else d


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
    """Refuse to mix runs: a folder with last.pth needs --resume (extractor) or --overwrite. Then
    lock the folder for this process (a second one stops with a one-line error naming it).
    Returns the checkpoint to resume from, or None."""
    last = run_dir / "last.pth"
    resume = getattr(args, "resume", False)
    if resume and not last.exists():
        raise UserError(f"--resume: no last.pth in {run_dir}")
    if not resume and last.exists() and not args.overwrite:
        raise UserError(f"{run_dir} already holds a run (last.pth); pass --overwrite to start again"
                        + (" or --resume to continue it" if hasattr(args, "resume") else ""))
    lock_folder(run_dir)
    if resume:
        return read_checkpoint(last)
    for p in list(run_dir.glob("*.pth")) + [run_dir / "log.csv"]:
        p.unlink(missing_ok=True)
    return None


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
def _check_kind(ckpt, kind, path):
    if ckpt.get("kind") != kind:
        what = {EXTRACTOR_KIND: "a D-ST feature extractor (ST/train_extractor.py)",
                CLASSIFIER_KIND: "a D-ST classifier (ST/train_classifier.py)"}[kind]
        raise UserError(f"{path} is not {what}")


def load_extractor(path, args):
    """The SupConNet saved at path, checked against this run's data/model/attack/ST settings (strict)."""
    if not Path(path).is_file():
        raise UserError(f"no feature extractor at {path}; run ST/train_extractor.py with the same flags "
                        "first, or name the checkpoint (--ckpt / --model_ckpt)")
    ckpt = read_checkpoint(path)
    _check_kind(ckpt, EXTRACTOR_KIND, path)
    check_compatible(ckpt, args, MODEL_KEYS + ATTACK_KEYS + ST_KEYS, path)
    meta = ckpt["args"]
    model = SupConNet(build_encoder(meta), ckpt.get("projection_dim", PROJECTION_DIM))
    return load_weights(model, ckpt, path), ckpt


def load_classifier(path, args, encoder):
    """The linear layer saved at path on top of ``encoder`` (which must be the one it was trained on)."""
    if not Path(path).is_file():
        raise UserError(f"no classifier at {path}; run ST/train_classifier.py with the same flags first, "
                        "or name it with --classifier_ckpt")
    ckpt = read_checkpoint(path)
    _check_kind(ckpt, CLASSIFIER_KIND, path)
    check_compatible(ckpt, args, MODEL_KEYS + ATTACK_KEYS + ST_KEYS, path)
    model = FrozenEncoderClassifier(encoder, ckpt["args"]["num_classes"], ckpt["args"].get("normalize_features", False))
    load_weights(model.linear, ckpt, path)
    if ckpt.get("encoder_fingerprint") not in (None, weights_fingerprint(encoder)):
        raise UserError(f"{path} was trained on another feature extractor ({ckpt.get('extractor')}); "
                        "pass the --model_ckpt it was trained with")
    return model, ckpt
