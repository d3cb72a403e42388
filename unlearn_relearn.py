"""BR step 2 (D-BR): unlearn the distinguished poisoned samples, relearn the clean ones (SPEC 5.2).

Each epoch: one pass of gradient ASCENT on the cross-entropy of D_p (unlearning), then one pass of
ordinary descent on D_c (relearning), both with the training augmentation; SGD lr 1e-4, momentum
0.9, wd 5e-4, batch 128, 20 epochs. ACC / ASR / ASR0 / R-ACC are evaluated before training and
after every epoch. Two models are saved: the one with the best ACC - ASR (the paper's rule; it
looks at the backdoor TEST set, which a real defender does not have) and the last epoch's.
Opt-in --select_holdout F adds a third, chosen without test labels: a seeded share F of D_p and of
D_c is held out of training, and the epoch with the best (held-out D_c accuracy - held-out D_p
"ASR", the share still predicted as its training label) is saved as ..._selected.tar.
Opt-in --relearn_stamp F estimates the trigger from the split itself (what D_p has in common that
D_c has not, see estimate_trigger) and stamps it on a share F of every relearning batch, labels
unchanged: the model is shown fresh triggered images of every class with their true labels, which
it cannot satisfy by memorising the few hundred images of D_p. --stamp_jitter J varies each stamp's
strength in [1 - J, 1 + J], which covers the gap between the estimate and the real trigger.
--stamp_source dominant_label estimates it from the D_p samples of D_p's most common label only: a
dirty-label all2one attack gives all its poisoned samples the target label, so the clean images FCT
let into D_p (mostly of other classes) no longer dilute the estimate.

The separated sets may come from SD models of another width (--sd_width) than the model purified
here; dataset, attack, poison rate and seed must match.
"""
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.args import (build_parser as shared_parser, holdout_share, positive_float, positive_int, resolve_device,
                        unit_interval, validate_args)
from utils.augment import train_augmentation
from utils.checkpoint import ATTACK_KEYS, check_compatible, model_from_checkpoint, save_checkpoint
from utils.errors import UserError, run_main
from utils.files import lock_folder, unlock_folder
from utils.logger import CSVLogger, print_header
from utils.paths import backdoor_dir, latest_checkpoint, split_dir
from utils.plots import save_trigger_estimate
from utils.split import SET_NAMES, load_split
from utils.supcon import balanced_class_weights
from utils.train import (cross_entropy, evaluate, format_metrics, generator, load_attack_data, make_optimizer,
                         make_runtime, place_train_data, predict, prepare_model, seed_everything, train_epoch)

COLUMNS = ["Epoch", "Test_ACC", "Test_ASR", "Test_ASR0", "Test_R-ACC", "Test_ACC_nontarget", "Unlearn_Loss",
           "Relearn_Loss", "Seconds"]
HOLDOUT_COLUMNS = ["Holdout_ACC_Dc", "Holdout_ASR_Dp"]
TEST_RULE = "best ACC - ASR on the backdoor test set"
SELECTED = "best held-out D_c accuracy - held-out D_p ASR (no test labels)"


def build_parser():
    p = shared_parser(__doc__, groups=("data", "attack", "model", "optim", "io", "sd"), epochs=20, lr=1e-4)
    g = p.add_argument_group("opt-in changes beyond the paper (off by default)")
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
    g.add_argument("--balance_classes", action="store_true",
                   help="weight the relearning cross-entropy so every class of D_c counts the same (the FCT "
                        "split is not class-balanced: the target class is often over-represented in D_c)")
    return p


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
    label = int(torch.bincount(labels).argmax())
    chosen = labels == label
    return images[chosen], label, chosen.float().mean().item()


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


def as_train_data(s, rt):
    """A separated set as the tensors train_epoch expects."""
    return place_train_data(rt, s["images"], s["labels"], s["gt_labels"], ~s["is_poisoned"])


def hold_out(s, share, g):
    """Split a separated set into (kept, held out): a seeded random ``share`` is held out."""
    n = len(s["labels"])
    order = torch.randperm(n, generator=g)
    k = int(round(share * n))
    held, kept = order[:k], order[k:]
    return {key: v[kept] for key, v in s.items()}, {key: v[held] for key, v in s.items()}


@torch.no_grad()
def holdout_metrics(model, held_clean, held_poison, rt):
    """Accuracy on held-out D_c and 'ASR' on held-out D_p (share predicted as its training label), in %."""
    def hit_rate(s):
        return 100.0 * (predict(model, s["images"], rt).argmax(1) == s["labels"]).float().mean().item()
    return {"Holdout_ACC_Dc": hit_rate(held_clean), "Holdout_ASR_Dp": hit_rate(held_poison)}


def output_paths(args, victim):
    folder = Path(victim).parent
    best = Path(args.checkpoint_save) if args.checkpoint_save else folder / f"{Path(victim).stem}_unlearn_purify.tar"
    best = best.with_suffix(".tar")
    last = best.with_name(best.stem + "_last.tar")
    log = Path(args.log) if args.log else folder / "unlearn_purify.csv"
    return best, last, log, best.with_name(best.stem + "_selected.tar")


def main(args):
    validate_args(args)
    rt = make_runtime(args, resolve_device(args))
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
    best_path, last_path, log_path, selected_path = output_paths(args, victim)
    if not args.overwrite and any(p.exists() for p in (best_path, last_path, selected_path)):
        raise UserError(f"{best_path} already exists; pass --overwrite or another --checkpoint_save")
    lock = (best_path.parent, f".{best_path.stem}.lock")
    lock_folder(*lock)  # one D-BR at a time on these outputs
    print_header("unlearn_relearn.py", args)
    seed_everything(args.seed)
    _, tests = load_attack_data(args, rt)
    model = prepare_model(model, rt)
    g = generator(args.seed)
    poison_part, clean_part = split["poison"], split["clean"]
    if args.select_holdout:
        poison_part, held_poison = hold_out(poison_part, args.select_holdout, g)
        clean_part, held_clean = hold_out(clean_part, args.select_holdout, g)
        if not len(held_poison["labels"]) or not len(held_clean["labels"]):
            raise UserError(f"--select_holdout {args.select_holdout} holds out no sample of D_p or D_c; use a larger share")
    poison_set, clean_set = as_train_data(poison_part, rt), as_train_data(clean_part, rt)
    print(f"purifying {victim} with |D_p| = {len(poison_set.labels)}, |D_c| = {len(clean_set.labels)}; "
          f"lr {args.lr}, {args.epochs} epochs")
    augment = relearn_augment = train_augmentation(args.dataset)
    if args.relearn_stamp:
        source = poison_set.images.cpu()
        if args.stamp_source == "dominant_label":
            source, label, share = dominant_label_part(source, poison_set.labels.cpu())
            print(f"trigger estimated from the {len(source)} D_p samples labelled {label} ({share:.0%} of D_p)")
        trigger = [t.to(rt.device) for t in estimate_trigger(source, clean_set.images.cpu())]
        relearn_augment = stamping(augment, trigger, args.relearn_stamp, args.stamp_jitter)
        examples = clean_set.images[:4].float().div(255)
        picture = best_path.with_name(best_path.stem + "_trigger_estimate.png")
        save_trigger_estimate(picture, trigger, examples, stamp_trigger(examples, trigger))
        print(f"relearning with the trigger estimated from D_p stamped on {args.relearn_stamp:.0%} of each batch, "
              f"strength jitter {args.stamp_jitter} (picture: {picture})")
    optimizer = make_optimizer(args, model.parameters())
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs, 1))
                 if args.lr_schedule == "cosine" else None)
    relearn = {}
    if args.balance_classes:
        weight = balanced_class_weights(clean_set.labels.cpu(), args.num_classes)
        print("class weights of the relearning CE: " + " ".join(f"{w:.2f}" for w in weight.tolist()))
        relearn["criterion"] = partial(cross_entropy, weight=weight.to(rt.device))
    unlearn = bounded_ascent_criterion(args.ascent_bound) if args.ascent_bound else None
    logger = CSVLogger(log_path, COLUMNS + (HOLDOUT_COLUMNS if args.select_holdout else []))
    select = (lambda: holdout_metrics(model, held_clean, held_poison, rt)) if args.select_holdout else dict

    metrics = {**evaluate(model, tests, rt, args.target_label), **select()}
    logger.write({"Epoch": -1, **metrics})
    print(f"before: {format_metrics(metrics)}")
    # the kept models: (rule, score of a metrics row, path); each saved whenever its score improves
    rules = [(TEST_RULE, lambda m: m["Test_ACC"] - m["Test_ASR"], best_path)]
    if args.select_holdout:
        rules.append((SELECTED, lambda m: m["Holdout_ACC_Dc"] - m["Holdout_ASR_Dp"], selected_path))
    kept = {}

    def keep_improved(epoch, metrics):
        for rule, score, path in rules:
            if rule not in kept or score(metrics) > kept[rule]["score"]:
                kept[rule] = {"score": score(metrics), "epoch": epoch, "metrics": metrics}
                save_checkpoint(path, args, model, epoch=epoch, selection=rule)

    keep_improved(-1, metrics)
    for epoch in range(args.epochs):
        t0 = time.time()
        extra = {"criterion": unlearn} if unlearn else {}
        u = train_epoch(model, poison_set, optimizer, rt, g, augment=augment, batch_size=args.batch_size,
                        ascent=True, desc=f"unlearn {epoch}", **extra)
        for _ in range(args.relearn_passes):
            r = train_epoch(model, clean_set, optimizer, rt, g, augment=relearn_augment, batch_size=args.batch_size,
                            desc=f"relearn {epoch}", **relearn)
        if scheduler is not None:
            scheduler.step()
        metrics = {**evaluate(model, tests, rt, args.target_label), **select()}
        logger.write({"Epoch": epoch, **metrics, "Unlearn_Loss": u["Train_Loss"], "Relearn_Loss": r["Train_Loss"],
                      "Seconds": time.time() - t0})
        print(f"epoch {epoch:3d}  unlearn loss {u['Train_Loss']:.3f}  relearn loss {r['Train_Loss']:.3f}  "
              f"{format_metrics(metrics)}")
        keep_improved(epoch, metrics)
    save_checkpoint(last_path, args, model, epoch=args.epochs - 1, selection="last epoch")
    unlock_folder(*lock)
    best, chosen = kept[TEST_RULE], kept.get(SELECTED)
    print(f"best ACC - ASR (chosen on the backdoor TEST set, as the paper did): epoch {best['epoch']}  "
          f"{format_metrics(best['metrics'])}  -> {best_path}")
    print(f"last epoch (no test-set selection): epoch {args.epochs - 1}  {format_metrics(metrics)}  -> {last_path}")
    if chosen is not None:
        print(f"selected on held-out D_c / D_p (no test labels): epoch {chosen['epoch']}  "
              f"{format_metrics(chosen['metrics'])}  -> {selected_path}")
    return {"best": best, "last": metrics, "selected": chosen}


if __name__ == "__main__":
    run_main(main, build_parser())
