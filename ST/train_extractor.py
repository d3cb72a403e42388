"""D-ST step 1: a secure feature extractor by semi-supervised contrastive learning (SPEC 4.1).

Encoder (CIFAR ResNet without max-pool) + projection head trained on D_c u D_p u D_u with the
SupCon loss in which only D_c labels are trusted: a D_c anchor's positives are the other views of
D_c images of its class, a D_p / D_u anchor's only positive is its own other view. Two views per
image (resized crop, flip, colour jitter, grayscale) made batched on the device.
Paper: SGD lr 0.5, momentum 0.9, wd 1e-4, batch 512, temperature 0.1, 200 epochs, cosine down to
lr x 0.001 after a 10-epoch linear warm-up from 0.01.
"""
import argparse
import time

import torch

from utils.args import build_parser as shared_parser
from utils.args import describe_args, resolve_device
from utils.checkpoint import ATTACK_KEYS, MODEL_KEYS, check_compatible, load_weights, save_checkpoint
from utils.errors import UserError, run_main
from utils.logger import CSVLogger, print_header
from utils.supcon import (EXTRACTOR_DEFAULTS, EXTRACTOR_KIND, PROJECTION_DIM, ST_KEYS, SupConNet, add_st_flags,
                          build_encoder, extractor_dir, load_st_sets, prepare_args, run_epoch, semi_supcon_loss,
                          start_run, two_views, warmup_cosine_lr)
from utils.train import generator, make_optimizer, make_runtime, prepare_model, seed_everything

LOG_COLUMNS = ["Epoch", "Train_Loss", "LR", "Seconds"]


def build_parser():
    p = shared_parser(__doc__, groups=("data", "attack", "model", "optim", "io", "sd"), epochs=200,
                      lr=EXTRACTOR_DEFAULTS["lr"], weight_decay=EXTRACTOR_DEFAULTS["weight_decay"],
                      batch_size=EXTRACTOR_DEFAULTS["batch_size"], save_freq=20)
    g = add_st_flags(p, "extractor")
    g.add_argument("--temp", type=float, default=EXTRACTOR_DEFAULTS["temp"], help="temperature T of the loss")
    g.add_argument("--warm_epochs", type=float, default=10,
                   help="linear lr warm-up (epochs) from --warmup_from; at most half of the run")
    g.add_argument("--warmup_from", type=float, default=0.01)
    g.add_argument("--min_lr_ratio", type=float, default=0.001, help="the cosine ends at lr x this")
    g.add_argument("--time_budget", type=float, default=None, metavar="MINUTES",
                   help="set the epoch count (at most --epochs) from the measured first epoch so that the "
                        "run fits in MINUTES and its cosine schedule ends where it should")
    # paper-readme's spellings
    g.add_argument("--learning_rate", dest="lr", type=float, default=argparse.SUPPRESS, help="alias of --lr")
    g.add_argument("--cosine", action="store_true", help="accepted for paper-readme's command; always on")
    return p


def contrastive_step(model, data, rt, g, temperature):
    """The loss of one batch of indices: two views, one forward pass, the semi-supervised SupCon loss."""
    def step(idx):
        x = rt.images(data.images[idx])
        with rt.autocast():
            z = model(two_views(x, g))                          # (2B, 128), view-major
        z = z.view(2, len(idx), -1).transpose(0, 1)             # (B, 2, 128)
        labels = data.labels[idx].to(rt.device)
        return semi_supcon_loss(z, labels, data.trusted[idx].to(rt.device), temperature), {}
    return step


def main(args):
    prepare_args(args)
    rt = make_runtime(args, resolve_device(args))
    run_dir = extractor_dir(args)
    resume = start_run(args, run_dir)
    print_header("ST/train_extractor.py", args)
    seed_everything(args.seed)
    data, _, summary = load_st_sets(args, rt)
    print(summary)

    model = prepare_model(SupConNet(build_encoder(describe_args(args)), PROJECTION_DIM), rt)
    optimizer = make_optimizer(args, model.parameters())
    start = 0
    if resume is not None:  # continue with the run's own epoch count, so its schedule stays whole
        check_compatible(resume, args, MODEL_KEYS + ATTACK_KEYS + ST_KEYS, run_dir / "last.pth")
        load_weights(model, resume)
        optimizer.load_state_dict(resume["optimizer"])
        start, args.epochs = resume["epoch"] + 1, resume["args"]["epochs"]
        args.time_budget = None
    logger = CSVLogger(args.log or run_dir / "log.csv", LOG_COLUMNS, append=resume is not None)
    g = generator(args.seed + 7919 * start)
    step = contrastive_step(model, data, rt, g, args.temp)
    n, t_start = len(data.labels), time.time()
    print(f"run folder: {run_dir}\n{n} training images, device {rt.device}")

    epoch = start
    while epoch < args.epochs:
        t0 = time.time()
        warm = min(args.warm_epochs, args.epochs / 2)
        lr_at = lambda t: warmup_cosine_lr(t, args.epochs, args.lr, warm, args.warmup_from,  # noqa: E731
                                           args.min_lr_ratio)
        loss, _, lr = run_epoch(model, n, args.batch_size, g, step, optimizer, lr_at, epoch, f"SupCon {epoch}")
        if not torch.isfinite(torch.tensor(loss)):
            raise UserError(f"the loss diverged at epoch {epoch} (lr {lr:.3g}); try a smaller --lr")
        seconds = time.time() - t0
        if epoch == 0 and args.time_budget:
            args.epochs = fit_budget(args, seconds)
        logger.write({"Epoch": epoch, "Train_Loss": loss, "LR": lr, "Seconds": seconds})
        print(f"epoch {epoch:3d}/{args.epochs}  loss {loss:.4f}  lr {lr:.4f}  ({seconds:.1f} s)")
        save_checkpoint(run_dir / "last.pth", args, model, optimizer, epoch=epoch, kind=EXTRACTOR_KIND,
                        projection_dim=PROJECTION_DIM)
        if (epoch + 1) % max(args.save_freq, 1) == 0:
            save_checkpoint(run_dir / f"ckpt_epoch_{epoch + 1}.pth", args, model, epoch=epoch, kind=EXTRACTOR_KIND,
                            projection_dim=PROJECTION_DIM)
        epoch += 1
    minutes = (time.time() - t_start) / 60
    print(f"done: {args.epochs - start} epochs in {minutes:.1f} min; extractor {run_dir / 'last.pth'}")
    return model


def fit_budget(args, first_epoch_seconds):
    """The number of epochs (at most --epochs) that fits --time_budget minutes at the first epoch's pace."""
    epochs = max(1, min(args.epochs, int(args.time_budget * 60 // first_epoch_seconds)))
    warm = min(args.warm_epochs, epochs / 2)
    print(f"time budget {args.time_budget:g} min at {first_epoch_seconds:.1f} s/epoch: {epochs} epochs"
          + (f" (warm-up shortened to {warm:g} epochs)" if warm < args.warm_epochs else ""))
    return epochs


if __name__ == "__main__":
    run_main(main, build_parser())
