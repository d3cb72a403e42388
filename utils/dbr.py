"""D-BR's parts around the paper's unlearn/relearn loop (unlearn_relearn.py holds the loop itself).

- ``load_inputs``: the backdoored model and the separated sets, checked against the run's flags.
- ``Training``: D_p and D_c as training tensors, and what each pass uses: the augmentation, the
  criterion, the lr schedule. With no opt-in flag these are the paper's: the training augmentation,
  plain cross-entropy (ascended on D_p), a constant lr.
- ``Keeper``: the kept models, each saved whenever its selection score improves.

The opt-ins beyond the paper (off by default; BENCHMARKS.md, "What each opt-in does"):
- ``--ascent_bound B``: the unlearning cross-entropy is clamped per sample at B, so the ascent stops
  on the samples it has already unlearned.
- ``--relearn_passes N``: N passes over D_c per epoch.
- ``--lr_schedule cosine``: the lr anneals to 0 over the epochs, so the last epochs settle.
- ``--select_holdout F``: a seeded share F of D_p and of D_c is held out of training; the epoch
  with the best held-out D_c accuracy - held-out D_p "ASR" (the share still predicted as its
  training label) is saved as ``..._selected.tar``: model selection without test labels.
- ``--relearn_stamp F``: the trigger is estimated from the split itself (``estimate_trigger``) and
  stamped on a share F of every relearning batch, labels unchanged: the model sees fresh triggered
  images of every class with their true labels, which it cannot satisfy by memorising D_p.
  ``--stamp_jitter J`` draws each stamp's strength from [1 - J, 1 + J];
  ``--stamp_source dominant_label`` estimates from D_p's most common label only (the target of a
  dirty-label all2one attack), so that the clean images FCT let into D_p do not dilute it.
- ``--unlearn_source dominant_label``: the ascent runs on D_p's samples of its most common label
  only. An all2one or clean-label attack gives every poisoned sample the target label, so this keeps
  the poison and drops the clean images of the other classes that FCT let into D_p (which the
  ascent would otherwise unlearn, at the cost of their classes' accuracy).
- ``--balance_classes``: the relearning cross-entropy weighs every class of D_c the same (the FCT
  split over-represents the target class in D_c).
"""
from functools import partial

import torch
import torch.nn.functional as F

from utils.args import holdout_share, positive_float, positive_int, unit_interval
from utils.augment import train_augmentation
from utils.checkpoint import ATTACK_KEYS, check_compatible, model_from_checkpoint, save_checkpoint
from utils.errors import UserError
from utils.paths import backdoor_dir, latest_checkpoint, split_dir
from utils.plots import save_trigger_estimate
from utils.split import SET_NAMES, load_split
from utils.supcon import balanced_class_weights
from utils.train import cross_entropy, format_metrics, place_train_data, predict

COLUMNS = ["Epoch", "Test_ACC", "Test_ASR", "Test_ASR0", "Test_R-ACC", "Test_ACC_nontarget", "Unlearn_Loss",
           "Relearn_Loss", "Seconds"]
HOLDOUT_COLUMNS = ["Holdout_ACC_Dc", "Holdout_ASR_Dp"]
TEST_RULE = "best ACC - ASR on the backdoor test set"
SELECTED = "best held-out D_c accuracy - held-out D_p ASR (no test labels)"


def log_columns(args):
    return COLUMNS + (HOLDOUT_COLUMNS if args.select_holdout else [])


def add_opt_in_flags(parser):
    g = parser.add_argument_group("opt-in changes beyond the paper (off by default; see utils/dbr.py)")
    g.add_argument("--ascent_bound", type=positive_float, default=None,
                   help="unlearn only while a D_p sample's cross-entropy is below this bound "
                        "(per-sample clamp; bounds the ascent so it cannot run away)")
    g.add_argument("--relearn_passes", type=positive_int, default=1, help="passes over D_c per epoch")
    g.add_argument("--lr_schedule", default="constant", choices=("constant", "cosine"),
                   help="cosine: anneal the lr to 0 over --epochs, so the last epochs settle")
    g.add_argument("--select_holdout", type=holdout_share, default=0.0,
                   help="hold out this share of D_p and of D_c (seeded) and also save the epoch with the best "
                        "held-out D_c accuracy - held-out D_p ASR (model selection without test labels)")
    g.add_argument("--relearn_stamp", type=unit_interval, default=0.0,
                   help="stamp the trigger estimated from D_p and D_c on this share of each relearning batch, "
                        "labels unchanged (see estimate_trigger)")
    g.add_argument("--stamp_jitter", type=unit_interval, default=0.0,
                   help="with --relearn_stamp: draw each stamp's strength from [1 - J, 1 + J] around the estimate")
    g.add_argument("--stamp_source", default="poison_set", choices=("poison_set", "dominant_label"),
                   help="with --relearn_stamp: estimate the trigger from all of D_p, or from its samples of "
                        "D_p's most common label (the target of an all2one attack)")
    g.add_argument("--unlearn_source", default="poison_set", choices=("poison_set", "dominant_label"),
                   help="unlearn all of D_p, or only its samples of D_p's most common label (the target of an "
                        "all2one or clean-label attack), so that the clean images of other classes that FCT let "
                        "into D_p are not unlearned")
    g.add_argument("--balance_classes", action="store_true",
                   help="weight the relearning cross-entropy so every class of D_c counts the same (the FCT "
                        "split is not class-balanced: the target class is often over-represented in D_c)")


# ----------------------------------------------------------------------------------- inputs
def load_inputs(args):
    """(backdoored model, its path, the split): the model of --checkpoint_load or the newest
    withTrans checkpoint, and the separated sets, both checked against the run's flags."""
    victim = args.checkpoint_load or latest_checkpoint(backdoor_dir(args, "withTrans"))
    if victim is None:
        raise UserError(f"no backdoored model in {backdoor_dir(args, 'withTrans')}; run train_attack_withTrans.py "
                        "first or pass --checkpoint_load")
    model, ckpt = model_from_checkpoint(victim)
    check_compatible(ckpt, args, ("dataset",) + ATTACK_KEYS, victim)
    args.width = ckpt["args"]["width"]  # the purified model keeps its own width
    split = load_split(split_dir(args), args)
    for name in ("poison", "clean"):
        if len(split[name]["labels"]) == 0:
            raise UserError(f"the split in {split_dir(args)} has an empty {SET_NAMES[name]}: nothing to "
                            f"{'unlearn' if name == 'poison' else 'relearn'}")
    return model, victim, split


def refuse_overwrite(args, out):
    kept = (out["best"], out["last"], out["selected"])
    if not args.overwrite and any(p.exists() for p in kept):
        raise UserError(f"{out['best']} already exists; pass --overwrite or another --checkpoint_save")


def hold_out(s, share, g):
    """Split a separated set into (kept, held out): a seeded random ``share`` is held out."""
    n = len(s["labels"])
    order = torch.randperm(n, generator=g)
    k = int(round(share * n))
    held, kept = order[:k], order[k:]
    return {key: v[kept] for key, v in s.items()}, {key: v[held] for key, v in s.items()}


def as_train_data(s, rt):
    """A separated set as the tensors train_epoch expects."""
    return place_train_data(rt, s["images"], s["labels"], s["gt_labels"], ~s["is_poisoned"])


class Training:
    """D_p and D_c as training data, and the augmentation and criterion of each pass."""

    def __init__(self, args, split, rt, g, out):
        poison, clean = split["poison"], split["clean"]
        self.held = None
        if args.unlearn_source == "dominant_label":   # before the hold-out: held-out D_p is the same kind
            label, chosen = dominant_label(poison["labels"])
            print(f"unlearning the D_p samples labelled {label}, D_p's most common label: "
                  f"{int(chosen.sum())} ({chosen.float().mean().item():.0%} of D_p) before any hold-out")
            poison = {key: v[chosen] for key, v in poison.items()}
        if args.select_holdout:
            poison, held_poison = hold_out(poison, args.select_holdout, g)
            clean, held_clean = hold_out(clean, args.select_holdout, g)
            if not len(held_poison["labels"]) or not len(held_clean["labels"]):
                raise UserError(f"--select_holdout {args.select_holdout} holds out no sample of D_p or D_c; "
                                "use a larger share")
            self.held = {"poison": held_poison, "clean": held_clean}
        self.poison, self.clean = as_train_data(poison, rt), as_train_data(clean, rt)
        self.augment = self.relearn_augment = train_augmentation(args.dataset)
        if args.relearn_stamp:
            self.relearn_augment = self._stamping(args, rt, out["trigger_picture"])
        self.unlearn = {"criterion": bounded_ascent_criterion(args.ascent_bound)} if args.ascent_bound else {}
        self.relearn = {}
        if args.balance_classes:
            weight = balanced_class_weights(self.clean.labels.cpu(), args.num_classes)
            print("class weights of the relearning CE: " + " ".join(f"{w:.2f}" for w in weight.tolist()))
            self.relearn["criterion"] = partial(cross_entropy, weight=weight.to(rt.device))

    def _stamping(self, args, rt, picture):
        source = self.poison.images.cpu()
        if args.stamp_source == "dominant_label":
            source, label, share = dominant_label_part(source, self.poison.labels.cpu())
            print(f"trigger estimated from the {len(source)} D_p samples labelled {label} ({share:.0%} of D_p)")
        trigger = [t.to(rt.device) for t in estimate_trigger(source, self.clean.images.cpu())]
        examples = self.clean.images[:4].float().div(255)
        save_trigger_estimate(picture, trigger, examples, stamp_trigger(examples, trigger))
        print(f"relearning with the trigger estimated from D_p stamped on {args.relearn_stamp:.0%} of each batch, "
              f"strength jitter {args.stamp_jitter} (picture: {picture})")
        return stamping(self.augment, trigger, args.relearn_stamp, args.stamp_jitter)

    def holdout_metrics(self, model, rt):
        """Accuracy on held-out D_c and 'ASR' on held-out D_p (share predicted as its training label), in %;
        {} without --select_holdout."""
        if self.held is None:
            return {}

        def hit_rate(s):
            return 100.0 * (predict(model, s["images"], rt).argmax(1) == s["labels"]).float().mean().item()
        return {"Holdout_ACC_Dc": hit_rate(self.held["clean"]), "Holdout_ASR_Dp": hit_rate(self.held["poison"])}


class Keeper:
    """The kept models: (rule, score of a metrics row, path); each saved whenever its score improves.
    The paper's rule looks at the backdoor TEST set, which a real defender does not have."""

    def __init__(self, args, out, model):
        self.args, self.model, self.kept = args, model, {}
        self.rules = [(TEST_RULE, lambda m: m["Test_ACC"] - m["Test_ASR"], out["best"])]
        if args.select_holdout:
            self.rules.append((SELECTED, lambda m: m["Holdout_ACC_Dc"] - m["Holdout_ASR_Dp"], out["selected"]))

    def update(self, epoch, metrics):
        for rule, score, path in self.rules:
            if rule not in self.kept or score(metrics) > self.kept[rule]["score"]:
                self.kept[rule] = {"score": score(metrics), "epoch": epoch, "metrics": metrics}
                save_checkpoint(path, self.args, self.model, epoch=epoch, selection=rule)

    def summary(self, last, out):
        best, chosen = self.kept[TEST_RULE], self.kept.get(SELECTED)
        print(f"best ACC - ASR (chosen on the backdoor TEST set, as the paper did): epoch {best['epoch']}  "
              f"{format_metrics(best['metrics'])}  -> {out['best']}")
        print(f"last epoch (no test-set selection): epoch {self.args.epochs - 1}  {format_metrics(last)}  "
              f"-> {out['last']}")
        if chosen is not None:
            print(f"selected on held-out D_c / D_p (no test labels): epoch {chosen['epoch']}  "
                  f"{format_metrics(chosen['metrics'])}  -> {out['selected']}")
        return {"best": best, "last": last, "selected": chosen}


# ----------------------------------------------------------------------------------- opt-in maths
def bounded_ascent_criterion(bound):
    """Cross-entropy clamped per sample at ``bound``: ascent stops on samples already unlearned."""
    def criterion(model, x, y):
        logits = model(x)
        return F.cross_entropy(logits, y, reduction="none").clamp(max=bound).mean(), logits
    return criterion


def estimate_trigger(poison_images, clean_images):
    """The trigger as D_p shows it, from the two sets alone (uint8 (n, 3, H, W) tensors).

    Per pixel, D_p's mean minus D_c's mean is what a trigger adds on average, and the share by which
    D_p's spread is smaller than D_c's is how much of the pixel it overwrites: a patch pixel is
    (nearly) constant across D_p (mask 1), a blend with weight a shrinks the spread by a (mask a),
    an additive signal does not shrink it (mask 0). Returns (shift, mask, poison_mean) in [0, 1] units.
    """
    p, c = poison_images.float() / 255, clean_images.float() / 255
    poison_mean = p.mean(0)
    mask = (1 - p.std(0) / c.std(0).clamp_min(1e-3)).clamp(0, 1)
    return poison_mean - c.mean(0), mask, poison_mean


def dominant_label_part(images, labels):
    """The images of the most common label (its share of the set is printed by the caller)."""
    label, chosen = dominant_label(labels)
    return images[chosen], label, chosen.float().mean().item()


def dominant_label(labels):
    """(the most common label, the mask of the samples that carry it)."""
    label = int(torch.bincount(labels).argmax())
    return label, labels == label


def stamp_trigger(x, trigger):
    """Images in [0, 1] (n, 3, H, W) with the estimated trigger: overwrite by the mask, add the rest."""
    shift, mask, poison_mean = (t.to(x.device, x.dtype) for t in trigger)
    return ((1 - mask) * (x + shift) + mask * poison_mean).clamp_(0, 1)


def stamping(augment, trigger, share, jitter=0.0):
    """The training augmentation, then the estimated trigger on a seeded random ``share`` of the batch.

    jitter J > 0 draws each image's stamp strength k from [1 - J, 1 + J] (x + k (stamped - x)), so the
    model learns to ignore the trigger at every strength near the estimate, not only the estimate.
    """
    def transform(x, g):
        x = augment(x, g) if augment is not None else x
        chosen = (torch.rand(len(x), generator=g) < share).to(x.device)
        stamped = stamp_trigger(x, trigger)
        if jitter:
            k = 1 + jitter * (2 * torch.rand(len(x), generator=g) - 1)
            stamped = (x + k.to(x.device)[:, None, None, None] * (stamped - x)).clamp_(0, 1)
        return torch.where(chosen[:, None, None, None], stamped, x)
    return transform
