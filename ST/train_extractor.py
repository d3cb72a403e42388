"""D-ST step 1: a secure feature extractor by semi-supervised contrastive learning (SPEC 4.1).

Encoder (CIFAR ResNet without max-pool) + projection head trained on D_c u D_p u D_u with the
SupCon loss in which only D_c labels are trusted: a D_c anchor's positives are the other views of
D_c images of its class, a D_p / D_u anchor's only positive is its own other view. Two views per
image (resized crop, flip, colour jitter, grayscale) made batched on the device.
Paper: SGD lr 0.5, momentum 0.9, wd 1e-4, batch 512, temperature 0.1, 200 epochs, cosine down to
lr x 0.001 after a 10-epoch linear warm-up from 0.01.
"""
import argparse
import math
import time

import torch

from utils.args import build_parser as shared_parser
from utils.args import describe_args, nonneg_float, positive_float, rate, resolve_device
from utils.checkpoint import ATTACK_KEYS, MODEL_KEYS, check_compatible, load_weights, save_checkpoint
from utils.errors import UserError, run_main
from utils.files import unlock_folder
from utils.logger import CSVLogger, print_header
from utils.st import (EXTRACTOR_DEFAULTS, EXTRACTOR_KIND, ST_KEYS, add_st_flags, extractor_dir, load_st_sets,
                      prepare_args, start_run)
from utils.supcon import PROJECTION_DIM, SupConNet, build_encoder, semi_supcon_loss, two_views
from utils.train import (generator, make_optimizer, make_runtime, prepare_model, restore_rng, seed_everything,
                         sgd_epoch, warmup_cosine_lr)

LOG_COLUMNS = ["Epoch", "Train_Loss", "LR", "Seconds", "Epochs"]


def build_parser():
    p = shared_parser(__doc__, groups=("data", "attack", "model", "optim", "io", "sd"), step="st_extractor",
                      lr=EXTRACTOR_DEFAULTS["lr"], weight_decay=EXTRACTOR_DEFAULTS["weight_decay"],
                      batch_size=EXTRACTOR_DEFAULTS["batch_size"], save_freq=20)
    g = add_st_flags(p, "extractor")
    g.add_argument("--temp", type=positive_float, default=EXTRACTOR_DEFAULTS["temp"], help="temperature T of the loss")
    g.add_argument("--warm_epochs", type=nonneg_float, default=10,
                   help="linear lr warm-up (epochs) from --warmup_from; at most half of the run")
    g.add_argument("--warmup_from", type=positive_float, default=0.01)
    g.add_argument("--min_lr_ratio", type=rate, default=0.001, help="the cosine ends at lr x this")
    g.add_argument("--time_budget", type=positive_float, default=None, metavar="MINUTES",
                   help="set the epoch count (at most --epochs) from the measured pace of the first (warm-up) "
                        "epochs so that training fits in MINUTES and the cosine schedule still runs whole")
    g.add_argument("--budget_clock", default="wall", choices=("wall", "cpu"),
                   help="'cpu': count --time_budget in this process's CPU seconds / torch threads, i.e. the wall time "
                        "of the same work on an idle machine (for CPUs shared with other jobs; run with "
                        "OMP_WAIT_POLICY=PASSIVE so that waiting threads do not burn CPU time)")
    # paper-readme's spellings
    g.add_argument("--learning_rate", dest="lr", type=positive_float, default=argparse.SUPPRESS, help="alias of --lr")
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
    rt = make_runtime(args, resolve_device(args), extractor=True)  # bf16 and compiled on CPUs too
    run_dir = extractor_dir(args)
    resume = start_run(args, run_dir)                   # refuses to mix with an earlier run
    print_header("ST/train_extractor.py", args)
    seed_everything(args.seed)
    data, _, summary = load_st_sets(args, rt)           # D_c u D_p u D_u (or everything, --undefended)
    print(f"{summary}\nrun folder: {run_dir}\n{len(data.labels)} training images, device {rt.device}")
    model, optimizer, start = set_model(args, rt, resume, run_dir)
    logger = CSVLogger(args.log or run_dir / "log.csv", LOG_COLUMNS, append=resume is not None,
                       resume_after=start - 1 if resume is not None else None, recipe=args.recipe)
    g = generator(args.seed)
    if resume is not None:                              # the batch order and views continue bit for bit
        restore_rng(g, resume, run_dir / "last.pth")
    step = contrastive_step(model, data, rt, g, args.temp)
    budget = TimeBudget(args.time_budget, args.epochs, args.budget_clock) if args.time_budget else None
    t_start, epoch = time.time(), start
    while epoch < args.epochs:                          # args.epochs may shrink with --time_budget
        t0 = time.time()
        warm = min(args.warm_epochs, args.epochs / 2)
        lr_at = lambda t: warmup_cosine_lr(t, args.epochs, args.lr, warm, args.warmup_from,  # noqa: E731
                                           args.min_lr_ratio)
        r = sgd_epoch(model, len(data.labels), args.batch_size, g, optimizer, step, lr_at=lr_at, epoch=epoch,
                      desc=f"SupCon {epoch}", clock=budget.clock if budget else time.time)
        if not math.isfinite(r["loss"]):
            raise UserError(f"the loss diverged at epoch {epoch} (lr {r['lr']:.3g}); try a smaller --lr")
        if budget and (epoch == 0 or epoch + 1 < warm):  # the warm-up does not depend on the epoch count
            args.epochs = budget.update(r, args.warm_epochs)
        seconds = time.time() - t0
        logger.write({"Epoch": epoch, "Train_Loss": r["loss"], "LR": r["lr"], "Seconds": seconds,
                      "Epochs": args.epochs})
        print(f"epoch {epoch:3d}/{args.epochs}  loss {r['loss']:.4f}  lr {r['lr']:.4f}  ({seconds:.1f} s)")
        save(args, run_dir, model, optimizer, epoch, g)
        epoch += 1
    minutes = (time.time() - t_start) / 60
    unlock_folder(run_dir)
    print(f"done: {args.epochs - start} epochs in {minutes:.1f} min ({60 * minutes / max(args.epochs - start, 1):.1f} "
          f"s/epoch); extractor {run_dir / 'last.pth'}")
    return model


def set_model(args, rt, resume, run_dir):
    """Encoder + projection head and its SGD; a resumed run also gets its weights, optimiser state
    and its own epoch count (so that its schedule stays whole)."""
    model = prepare_model(SupConNet(build_encoder(describe_args(args)), PROJECTION_DIM), rt)
    optimizer = make_optimizer(args, model.parameters())
    if resume is None:
        return model, optimizer, 0
    check_compatible(resume, args, MODEL_KEYS + ATTACK_KEYS + ST_KEYS, run_dir / "last.pth")
    load_weights(model, resume, run_dir / "last.pth")
    optimizer.load_state_dict(resume["optimizer"])
    args.epochs, args.time_budget = resume["args"]["epochs"], None
    print(f"resuming {run_dir / 'last.pth'} at epoch {resume['epoch'] + 1} of {args.epochs}")
    return model, optimizer, resume["epoch"] + 1


def save(args, run_dir, model, optimizer, epoch, g):
    """last.pth every epoch (with the optimiser and random state, for --resume); ckpt_epoch_<N>.pth
    every --save_freq."""
    meta = {"kind": EXTRACTOR_KIND, "projection_dim": PROJECTION_DIM}
    save_checkpoint(run_dir / "last.pth", args, model, optimizer, epoch=epoch, rng_state=g.get_state(), **meta)
    if (epoch + 1) % max(args.save_freq, 1) == 0:
        save_checkpoint(run_dir / f"ckpt_epoch_{epoch + 1}.pth", args, model, epoch=epoch, **meta)


class TimeBudget:
    """--time_budget: how many epochs (at most --epochs) fit in the budget.

    Measured on the first epoch, whose first batch's extra time (kernel selection, oneDNN / cuDNN
    warm-up) is counted once rather than every epoch, and measured again after every warm-up
    epoch: the warm-up lr does not depend on the epoch count, so the count may still change then,
    and it is fixed before the cosine part starts, which therefore always runs whole.
    clock 'wall': seconds on the wall; 'cpu': this process's CPU seconds / torch threads, i.e. the
    wall time the same work takes on an otherwise idle machine (for shared CPUs; CPU runs only).
    """

    def __init__(self, minutes, max_epochs, clock="wall"):
        self.seconds, self.max_epochs, self.kind = 60 * minutes, max_epochs, clock
        threads = torch.get_num_threads()
        self.clock = time.time if clock == "wall" else (lambda: time.process_time() / threads)
        self.spent, self.done, self.overhead = 0.0, 0, None

    def update(self, r, warm_epochs):
        if self.overhead is None:
            typical = (r["seconds"] - r["first_batch_seconds"]) / max(r["batches"] - 1, 1)
            self.overhead = max(r["first_batch_seconds"] - typical, 0.0) if r["batches"] > 1 else 0.0
        self.spent += r["seconds"]
        self.done += 1
        pace = max(self.spent - self.overhead, 1e-9) / self.done
        epochs = max(self.done, min(self.max_epochs, int((self.seconds - self.overhead) // pace)))
        warm = min(warm_epochs, epochs / 2)
        print(f"time budget {self.seconds / 60:g} min ({self.kind} clock) at {pace:.1f} s/epoch "
              f"(+{self.overhead:.1f} s warm-up once): {epochs} epochs"
              + (f", warm-up shortened to {warm:g} epochs" if warm < warm_epochs else ""))
        return epochs


if __name__ == "__main__":
    run_main(main, build_parser())
