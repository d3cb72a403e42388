"""The maths of the SD module (SPEC section 3): intra-class loss, FCT metric, thresholds, split."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from utils.augment import apply_fct_transform, sample_fct_params
from utils.train import generator


def intra_class_loss(features, labels):
    """L_intra: mean of the K x K matrix of cos(c_i, c_j) with its diagonal set to 0.

    features: (B, d) penultimate features; labels: (B,) the training labels. c_k is the mean
    feature of the batch samples labelled k, K the number of classes present in the batch.
    Minimising L pushes the class centres apart.
    """
    classes, inverse = labels.unique(return_inverse=True)
    k = len(classes)
    sums = torch.zeros(k, features.shape[1], device=features.device, dtype=features.dtype)
    sums = sums.index_add(0, inverse, features)
    counts = torch.bincount(inverse, minlength=k).to(features.dtype)
    centres = F.normalize(sums / counts[:, None], dim=1)
    cos = centres @ centres.T
    return (cos * (1 - torch.eye(k, device=cos.device, dtype=cos.dtype))).mean()


def intra_class_criterion(model, x, y):
    """Training criterion of finetune_attack_noTrans.py: (L_intra, logits)."""
    features = model.features(x)
    return intra_class_loss(features.float(), y), model.linear(features)


@torch.no_grad()
def fct_values(model, images, rt, transforms=("rotate", "affine"), seed=0, batch_size=512, draws=1):
    """FCT metric Delta(x) = mean_d (f(x) - f(tau(x)))^2 for every image (SPEC section 3.3).

    images: uint8 (N, 3, H, W); f = model.features in eval mode; tau applies ``transforms`` in
    order, each sample with its own random parameters, drawn for all N samples up front from
    ``seed`` (so Delta does not depend on the batch size). draws > 1 (opt-in, beyond the paper)
    averages Delta over that many independent tau per sample; the first draw is the draws=1 tau.
    Returns a float64 numpy array (N,).
    """
    model.eval()
    n, size = len(images), images.shape[-1]
    g = generator(seed)
    taus = [[(name, sample_fct_params(name, n, g, size)) for name in transforms] for _ in range(draws)]
    out = np.zeros(n, dtype=np.float64)
    for i in range(0, n, batch_size):
        x = rt.images(images[i:i + batch_size])
        views = [x]
        for tau in taus:
            xt = x
            for name, p in tau:
                xt = apply_fct_transform(name, xt, {k: v[i:i + batch_size] for k, v in p.items()})
            views.append(xt.contiguous(memory_format=torch.channels_last))
        with rt.autocast(inference=True):  # one forward for x and its tau(x): BN is in eval mode, so they do not mix
            f = model.features(torch.cat(views)).float().view(len(views), len(x), -1)
        out[i:i + len(x)] = ((f[:1] - f[1:]) ** 2).mean(2).mean(0).cpu().numpy()
    return out


def thresholds(values, clean_ratio, poison_ratio):
    """gamma_c = sorted(Delta)[floor(a_c N)], gamma_p = sorted(Delta)[N - floor(a_p N)] (SPEC 3.4)."""
    v = np.sort(np.asarray(values))
    n = len(v)
    n_c, n_p = _floor(clean_ratio * n), _floor(poison_ratio * n)
    gamma_c = float(v[min(n_c, n - 1)])
    gamma_p = float(v[n - n_p]) if n_p > 0 else math.inf
    return gamma_c, gamma_p


def _floor(x):
    return math.floor(round(x, 9))


def split_by_threshold(values, gamma_low, gamma_high):
    """Delta <= gamma_c -> D_c; Delta >= gamma_p -> D_p; the rest -> D_u (index arrays)."""
    values = np.asarray(values)
    clean = values <= gamma_low
    poison = (values >= gamma_high) & ~clean
    return {"clean": np.flatnonzero(clean), "poison": np.flatnonzero(poison),
            "suspicious": np.flatnonzero(~clean & ~poison)}


def split_by_rank(values, clean_ratio, poison_ratio, seed=0):
    """The floor(a_c N) smallest Delta -> D_c, the floor(a_p N) largest -> D_p, ties broken by a
    seeded random order. Returns (index sets, whether a tie at a boundary had to be broken)."""
    values = np.asarray(values)
    n = len(values)
    n_c, n_p = _floor(clean_ratio * n), _floor(poison_ratio * n)
    tiebreak = np.random.default_rng(seed).permutation(n)
    order = np.lexsort((tiebreak, values))  # by Delta, then by the random key
    sets = {"clean": np.sort(order[:n_c]), "poison": np.sort(order[n - n_p:]),
            "suspicious": np.sort(order[n_c:n - n_p])}
    s = values[order]
    ties = (0 < n_c < n and s[n_c - 1] == s[n_c]) or (0 < n_p < n and s[n - n_p - 1] == s[n - n_p])
    return sets, bool(ties)


def auroc(scores, positives):
    """Area under the ROC curve of ``scores`` as a detector of ``positives`` (ties count half)."""
    import pandas as pd
    scores, positives = np.asarray(scores), np.asarray(positives, dtype=bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def split_report(sets, is_poisoned, values):
    """Quality of a split against the ground truth (percentages and the AUROC of Delta)."""
    is_poisoned = np.asarray(is_poisoned, dtype=bool)
    share = lambda idx: 100.0 * is_poisoned[idx].mean() if len(idx) else 0.0  # noqa: E731
    total = max(int(is_poisoned.sum()), 1)
    return {
        "n_clean_set": int(len(sets["clean"])), "n_poison_set": int(len(sets["poison"])),
        "n_uncertain_set": int(len(sets["suspicious"])),
        "poison_in_clean_set_pct": share(sets["clean"]), "poison_in_poison_set_pct": share(sets["poison"]),
        "poison_in_uncertain_set_pct": share(sets["suspicious"]),
        "poison_recall_pct": 100.0 * is_poisoned[sets["poison"]].sum() / total,
        "auroc": auroc(values, is_poisoned),
        "n_poisoned_total": int(is_poisoned.sum()),
        "median_fct_clean": float(np.median(values[~is_poisoned])) if (~is_poisoned).any() else None,
        "median_fct_poison": float(np.median(values[is_poisoned])) if is_poisoned.any() else None,
    }


def sd_model_dir(args):
    """The run folder of the SD model that --sd_model names (the fine-tuned one by default)."""
    from utils.args import SD_MODELS
    from utils.paths import backdoor_dir
    return backdoor_dir(args, SD_MODELS[args.sd_model])


def fct_checkpoint(args):
    """The SD model that Delta is measured with: --checkpoint_load, or the newest one of the run
    that --sd_model names (the paper: noTrans_ftsimi, the L_intra fine-tuned model)."""
    from utils.errors import UserError
    from utils.paths import latest_checkpoint
    if args.checkpoint_load:
        return args.checkpoint_load
    folder = sd_model_dir(args)
    path = latest_checkpoint(folder)
    if path is None:
        script = "finetune_attack_noTrans.py" if args.sd_model == "finetuned" else "train_attack_noTrans.py"
        raise UserError(f"no {args.sd_model} SD model in {folder}; run {script} first or pass --checkpoint_load")
    print(f"using the newest {args.sd_model} SD model {path}")
    return path


FCT_SETTINGS = ("trans1", "trans2", "fct_draws", "seed", "trigger_asset", "data_tag")


def fct_settings(args):
    """What makes Delta what it is besides the checkpoint (whose folder holds it): <e>_fct.json."""
    from utils.checkpoint import run_meta
    current = run_meta(args)
    return {k: current.get(k) for k in FCT_SETTINGS}


def load_fct_inputs(args, rt, checkpoint=None):
    """The fine-tuned SD model (checked against args) and the poisoned training set it is measured on.
    checkpoint: fct_checkpoint(args), when the caller has resolved it already.

    Returns (model on the device, train_set, checkpoint path)."""
    from utils.checkpoint import ATTACK_KEYS, check_compatible, model_from_checkpoint
    from utils.train import load_attack_data, prepare_model
    path = checkpoint or fct_checkpoint(args)
    model, ckpt = model_from_checkpoint(path)
    check_compatible(ckpt, args, ("dataset",) + ATTACK_KEYS, path)
    train_set, _ = load_attack_data(args, rt)
    return prepare_model(model, rt), train_set, path


def compute_fct(args, rt, batch_size=512, inputs=None, checkpoint=None):
    """Delta for every training sample of args' attack (tau = args.trans1 + args.trans2), from the
    fine-tuned SD model. inputs: load_fct_inputs' result, to measure several tau without reloading;
    checkpoint: the fine-tuned model's path, when the caller has resolved it.

    Returns (values, train_set, checkpoint path, seconds spent on Delta).
    """
    import time
    model, train_set, path = inputs or load_fct_inputs(args, rt, checkpoint)
    t0 = time.time()
    values = fct_values(model, train_set.images, rt, (args.trans1, args.trans2), args.seed, batch_size,
                        getattr(args, "fct_draws", 1))
    return values, train_set, path, time.time() - t0
