"""BR step 2 (D-BR): unlearn the distinguished poisoned samples, relearn the clean ones (SPEC 5.2).

Each epoch: one pass of gradient ASCENT on the cross-entropy of D_p (unlearning), then one pass of
ordinary descent on D_c (relearning), both with the training augmentation; SGD lr 1e-4, momentum
0.9, wd 5e-4, batch 128, 20 epochs. ACC / ASR / ASR0 / R-ACC are evaluated before training and
after every epoch. Two models are saved: the one with the best ACC - ASR (the paper's rule; it
looks at the backdoor TEST set, which a real defender does not have) and the last epoch's.
The opt-in changes beyond the paper (bounded ascent, trigger stamping, held-out selection, class
weights; all off by default) are described and implemented in utils/dbr.py.

The separated sets may come from SD models of another width (--sd_width) than the model purified
here; dataset, attack, poison rate and seed must match.
"""
import time

from utils import dbr
from utils.args import build_parser as shared_parser, resolve_device, validate_args
from utils.checkpoint import save_checkpoint
from utils.errors import run_main
from utils.files import folder_lock
from utils.logger import CSVLogger, print_header
from utils.paths import dbr_outputs
from utils.train import (evaluate, format_metrics, generator, load_attack_data, make_optimizer, make_runtime,
                         make_scheduler, prepare_model, seed_everything, train_epoch)


def build_parser():
    p = shared_parser(__doc__, groups=("data", "attack", "model", "optim", "io", "sd"), step="dbr")
    dbr.add_opt_in_flags(p)
    return p


def main(args):
    validate_args(args)
    rt = make_runtime(args, resolve_device(args))
    model, victim, split = dbr.load_inputs(args)
    out = dbr_outputs(args, victim)
    dbr.refuse_overwrite(args, out)
    with folder_lock(out["best"].parent, f".{out['best'].stem}.lock"):  # one D-BR at a time on these outputs
        print_header("unlearn_relearn.py", args)
        seed_everything(args.seed)
        _, tests = load_attack_data(args, rt)
        model, g = prepare_model(model, rt), generator(args.seed)
        sets = dbr.Training(args, split, rt, g, out)         # D_p, D_c and what each pass uses
        print(f"purifying {victim} with |D_p| = {len(sets.poison.labels)}, |D_c| = {len(sets.clean.labels)}; "
              f"lr {args.lr}, {args.epochs} epochs")
        optimizer = make_optimizer(args, model.parameters())
        scheduler = make_scheduler(optimizer, args, args.lr_schedule, period=max(args.epochs, 1))
        logger = CSVLogger(out["log"], dbr.log_columns(args), recipe=args.recipe)
        keeper = dbr.Keeper(args, out, model)
        metrics = {**evaluate(model, tests, rt, args.target_label), **sets.holdout_metrics(model, rt)}
        logger.write({"Epoch": -1, **metrics})
        print(f"before: {format_metrics(metrics)}")
        keeper.update(-1, metrics)
        for epoch in range(args.epochs):
            t0 = time.time()
            # unlearn: one pass of gradient ASCENT on the cross-entropy of D_p
            u = train_epoch(model, sets.poison, optimizer, rt, g, augment=sets.augment, batch_size=args.batch_size,
                            ascent=True, desc=f"unlearn {epoch}", **sets.unlearn)
            # relearn: one pass of ordinary descent on D_c
            for _ in range(args.relearn_passes):
                r = train_epoch(model, sets.clean, optimizer, rt, g, augment=sets.relearn_augment,
                                batch_size=args.batch_size, desc=f"relearn {epoch}", **sets.relearn)
            scheduler.step()
            metrics = {**evaluate(model, tests, rt, args.target_label), **sets.holdout_metrics(model, rt)}
            logger.write({"Epoch": epoch, **metrics, "Unlearn_Loss": u["Train_Loss"], "Relearn_Loss": r["Train_Loss"],
                          "Seconds": time.time() - t0})
            print(f"epoch {epoch:3d}  unlearn loss {u['Train_Loss']:.3f}  relearn loss {r['Train_Loss']:.3f}  "
                  f"{format_metrics(metrics)}")
            keeper.update(epoch, metrics)
        save_checkpoint(out["last"], args, model, epoch=args.epochs - 1, selection="last epoch")
    return keeper.summary(metrics, out)


if __name__ == "__main__":
    run_main(main, build_parser())
