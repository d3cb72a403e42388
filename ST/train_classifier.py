"""D-ST step 2: a secure classifier by minimising a mixed cross-entropy (SPEC 4.2).

The encoder of step 1 is frozen (eval mode); a linear layer on its features is trained on
D_c u D_p, with the same augmentation as step 1, to minimise CE(D_c) - lambda * CE(D_p): fit the
trusted labels, move away from the labels of the detected poisoned samples. Paper: lambda 0.001,
SGD lr 5, momentum 0.9, no weight decay, batch 512, 10 epochs.
ACC / ASR / ASR0 / R-ACC are logged every epoch; the LAST epoch's model is kept (no choice made
on the test set, which a defender does not have).
"""
import argparse
import time
from pathlib import Path

import torch

from utils.args import build_parser as shared_parser
from utils.args import positive_float, resolve_device
from utils.augment import supcon_view
from utils.checkpoint import save_checkpoint
from utils.errors import UserError, run_main
from utils.files import unlock_folder
from utils.logger import CSVLogger, print_header
from utils.st import (CLASSIFIER_KIND, add_classifier_recipe_flags, add_st_flags, classifier_dir, default_extractor,
                      load_extractor, load_st_sets, prepare_args, start_run)
from utils.supcon import FrozenEncoderClassifier, balanced_class_weights, mixed_cross_entropy, weights_fingerprint
from utils.train import (evaluate, format_metrics, generator, make_runtime, prepare_model, seed_everything, sgd_epoch,
                         warmup_cosine_lr)

LOG_COLUMNS = ["Epoch", "Train_Loss", "Train_ACC_Dc", "Train_ACC_Dp", "Test_ACC", "Test_ASR", "Test_ASR0",
               "Test_R-ACC", "Test_ACC_nontarget", "Test_Loss_cl", "LR", "Seconds"]


def build_parser():
    p = shared_parser(__doc__, groups=("data", "attack", "model", "optim", "io", "sd"), step="st_classifier", lr=5.0,
                      weight_decay=0.0, batch_size=512, save_freq=1)
    g = add_st_flags(p, "classifier")
    g.add_argument("--ckpt", default=None,
                   help="the feature extractor (default: last.pth of the paper-recipe train_extractor.py run "
                        "with these data / model / attack flags and --temp)")
    add_classifier_recipe_flags(g)
    g.add_argument("--learning_rate", dest="lr", type=positive_float, default=argparse.SUPPRESS, help="alias of --lr")
    return p


def pct(hits, n):
    return 100.0 * hits / n if n else float("nan")


def mixed_ce_step(model, data, rt, g, lam, class_weight=None):
    """The loss of one batch of indices: one augmented view, CE(D_c) - lam * CE(D_p)."""
    def step(idx):
        x = supcon_view(rt.images(data.images[idx]), g).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), rt.autocast(inference=True):  # the frozen encoder: a forward-only pass
            features = model.features(x).float()
        with rt.autocast():
            logits = model.linear(features).float()
        y = data.labels[idx].to(rt.device)
        in_p = data.in_poison_set[idx].to(rt.device)
        hit = logits.argmax(1) == y
        counts = {"n_c": (~in_p).sum(), "hit_c": (hit & ~in_p).sum(), "n_p": in_p.sum(), "hit_p": (hit & in_p).sum()}
        return mixed_cross_entropy(logits, y, in_p, lam, class_weight), counts
    return step


def main(args):
    prepare_args(args)
    if args.resume:
        raise UserError("the classifier takes seconds to train: rerun it with --overwrite instead of --resume")
    rt = make_runtime(args, resolve_device(args))
    extractor_path = args.ckpt or default_extractor(args)
    extractor, _ = load_extractor(extractor_path, args)     # checked before any output is written
    run_dir = classifier_dir(args)
    start_run(args, run_dir)
    print_header("ST/train_classifier.py", args)
    seed_everything(args.seed)
    data, tests, summary = load_st_sets(args, rt, names=("clean", "poison"))
    print(summary)

    model = prepare_model(FrozenEncoderClassifier(extractor.encoder, args.num_classes, args.normalize_features), rt)
    encoder_fp = weights_fingerprint(model.encoder)
    optimizer = torch.optim.SGD(model.linear.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    lr_at = lambda t: (warmup_cosine_lr(t, args.epochs, args.lr, args.warm_epochs, args.warmup_from)  # noqa: E731
                       if args.cosine or t < args.warm_epochs else args.lr)
    logger = CSVLogger(args.log or run_dir / "log.csv", LOG_COLUMNS, recipe=args.recipe)
    g = generator(args.seed)
    class_weight = None
    if args.balance_classes:
        class_weight = balanced_class_weights(data.labels[~data.in_poison_set].cpu(), args.num_classes)
        print("class weights of CE(D_c): " + " ".join(f"{w:.2f}" for w in class_weight.tolist()))
        class_weight = class_weight.to(rt.device)
    step = mixed_ce_step(model, data, rt, g, 0.0 if args.undefended else args.lambda_p, class_weight)
    print(f"run folder: {run_dir}\nextractor {extractor_path}\n{len(data.labels)} training images, device {rt.device}")
    meta = {"kind": CLASSIFIER_KIND, "extractor": str(Path(extractor_path).resolve()),
            "encoder_fingerprint": encoder_fp}

    for epoch in range(args.epochs):
        t0 = time.time()
        r = sgd_epoch(model, len(data.labels), args.batch_size, g, optimizer, step, lr_at=lr_at, epoch=epoch,
                      desc=f"linear {epoch}")
        loss, c, lr = r["loss"], r["stats"], r["lr"]
        metrics = evaluate(model, tests, rt, args.target_label)
        logger.write({"Epoch": epoch, "Train_Loss": loss, "Train_ACC_Dc": pct(c["hit_c"], c["n_c"]),
                      "Train_ACC_Dp": pct(c["hit_p"], c["n_p"]), **metrics, "LR": lr, "Seconds": time.time() - t0})
        print(f"epoch {epoch:2d}  loss {loss:.4f}  {format_metrics(metrics)}  ({time.time() - t0:.1f} s)")
        if (epoch + 1) % max(args.save_freq, 1) == 0:
            save_checkpoint(run_dir / f"ckpt_epoch_{epoch}.pth", args, model.linear, epoch=epoch, **meta)
    save_checkpoint(run_dir / "last.pth", args, model.linear, epoch=args.epochs - 1, **meta)
    if weights_fingerprint(model.encoder) != encoder_fp:  # MoCo-style sanity check: the encoder stayed frozen
        raise RuntimeError("the frozen encoder changed during classifier training")
    unlock_folder(run_dir)
    print(f"kept the LAST epoch's classifier (no model selection on the test set): {run_dir / 'last.pth'}")
    return model, metrics


if __name__ == "__main__":
    run_main(main, build_parser())
