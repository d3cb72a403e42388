"""The one training loop and the one evaluation function of the project.

Scripts differ only in what they pass: the data, the augmentation, the loss (``criterion``), the
learning-rate schedule and the direction of the step (descent, or ascent for unlearning).
"""
import contextlib
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from dataloader_bd import build_datasets, load_raw
from utils.args import use_amp, use_compile, use_inference_amp
from utils.checkpoint import (ATTACK_KEYS, MODEL_KEYS, check_compatible, load_weights, model_from_checkpoint,
                              read_checkpoint, save_checkpoint)
from utils.errors import UserError
from utils.files import lock_folder, unlock_folder
from utils.logger import CSVLogger, progress
from utils.paths import clean_model_dir, latest_checkpoint

TRAIN_COLUMNS = ["Epoch", "Train_Loss", "Train_ACC", "Train_ASR", "Train_R-ACC", "Test_Loss_cl", "Test_ACC",
                 "Test_Loss_bd", "Test_ASR", "Test_R-ACC", "Test_ASR0", "Test_ACC_nontarget", "LR", "Seconds"]
_BIG = 2 << 30  # datasets above 2 GiB stay in host memory and travel batch by batch


@dataclass
class Runtime:
    """Where and how tensors are computed."""
    device: torch.device
    amp: bool = False              # bf16 autocast of training steps
    inference_amp: bool = None     # ... of forward-only passes (evaluation, FCT); None: as amp
    compile: bool = False          # torch.compile of the networks prepare_model places

    def __post_init__(self):
        if self.inference_amp is None:
            self.inference_amp = self.amp

    def autocast(self, inference=False):
        if self.inference_amp if inference else self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def place(self, t):
        return t.to(self.device) if t.numel() * t.element_size() < _BIG else t.pin_memory() \
            if self.device.type == "cuda" else t

    def images(self, x):
        """uint8 (N, 3, H, W) -> float in [0, 1] on the device, channels-last (faster on GPU and,
        measured, about 14% faster on a 2-core CPU too)."""
        x = x.to(self.device, non_blocking=True).float().div_(255)
        return x.contiguous(memory_format=torch.channels_last)


def make_runtime(args, device, extractor=False):
    """extractor: the D-ST extractor's step, where --amp auto and --compile auto are also on for CPUs
    (bf16 training on native-bf16 CPUs, and torch.compile: utils.args.use_amp and use_compile)."""
    return Runtime(device, use_amp(args, device, extractor), use_inference_amp(args, device),
                   use_compile(args, device, extractor))


def prepare_model(model, rt, compile=True):
    """The network on the device, channels-last; compiled in place where rt.compile (and ``compile``),
    so that its state_dict, and with it every checkpoint, is the plain module's. dynamic=False: one
    kernel set per batch shape (two per epoch: the full batches and the last one)."""
    model = model.to(rt.device, memory_format=torch.channels_last)
    if compile and rt.compile:
        # on a CPU-only machine torch's C++ builder warns once that it found no CUDA runtime: not news here
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        model.compile(dynamic=False)
    return model


def generator(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def batch_indices(n, batch_size, g=None, device=None):
    """Index batches over n samples: a seeded permutation when g is given, in order otherwise.
    device: where the indices live (the device of the data they index: moved there once per epoch
    instead of once per batch, since every small host-to-GPU copy waits for the GPU)."""
    order = torch.randperm(n, generator=g) if g is not None else torch.arange(n)
    if device is not None:
        order = order.to(device)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


# ----------------------------------------------------------------------------------- losses
def cross_entropy(model, x, y, weight=None):
    """The default train_epoch criterion; ``weight`` (per class) as in F.cross_entropy."""
    logits = model(x)
    return F.cross_entropy(logits, y, weight=weight), logits


# ----------------------------------------------------------------------------------- one epoch
def sgd_epoch(model, n, batch_size, g, optimizer, step, *, ascent=False, lr_at=None, epoch=0, device=None,
              desc="train", clock=time.time):
    """The one SGD pass of every training step of the project (SD, D-BR, the victims, both ST steps).

    Seeded batches of indices over n samples (``device``: where the indices live, the device of the
    data they index). ``step(idx) -> (loss, stats)`` computes a batch's mean loss and a dict of
    per-batch sums (tensors or numbers, may be empty) to add up. ascent=True maximises the loss (the
    unlearning pass of D-BR). ``lr_at(t)``, when given, sets the lr at the fractional epoch
    ``epoch + i / batches`` before each step (the per-step schedule of ST); otherwise the optimiser's
    lr stays. The sums stay on the device: the host waits for it after the first batch (to time
    the kernel warm-up) and at the end, not once per batch.

    Returns a dict: the sample-weighted mean ``loss``, the summed ``stats`` (floats), the last
    ``lr``, the ``seconds`` (by ``clock``) of the pass and of its first batch, and the batch count.
    """
    model.train()
    t0 = clock()
    batches = batch_indices(n, batch_size, g, device=device)
    loss_sum, sums, first = 0.0, {}, None
    for i, idx in enumerate(progress(batches, desc)):
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch + i / len(batches))
        loss, stats = step(idx)
        optimizer.zero_grad(set_to_none=True)
        (-loss if ascent else loss).backward()
        optimizer.step()
        with torch.no_grad():
            loss_sum = loss_sum + loss.detach().float() * len(idx)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v
        if first is None:
            float(loss_sum)  # waits for the device: the first batch's time is its own
            first = clock() - t0
    loss_sum = float(loss_sum)
    return {"loss": loss_sum / max(n, 1), "stats": {k: _host(v) for k, v in sums.items()},
            "lr": optimizer.param_groups[0]["lr"], "seconds": clock() - t0, "first_batch_seconds": first or 0.0,
            "batches": len(batches)}


def _host(v):
    return v.tolist() if torch.is_tensor(v) else v


def train_epoch(model, data, optimizer, rt, g, criterion=cross_entropy, augment=None, batch_size=128,
                ascent=False, desc="train"):
    """One pass of ``criterion`` over ``data`` (a PoisonedTrainSet-like object, tensors on the device
    or host), augmented per batch by ``augment`` where given; ascent=True for D-BR's unlearning.

    Returns the mean loss, accuracy on the given labels, and on the poisoned samples the share
    predicted as their poisoned label (ASR) and as their true class (R-ACC), all in percent.
    """
    def step(idx):
        x = rt.images(data.images[idx])
        if augment is not None:  # grid_sample returns NCHW: back to the layout the network runs in
            x = augment(x, g).contiguous(memory_format=torch.channels_last)
        y = data.labels[idx].to(rt.device, non_blocking=True)
        with rt.autocast():
            loss, logits = criterion(model, x, y)
        with torch.no_grad():  # correct, n_poison, asr hits, racc hits: one stacked sum per batch
            pred = logits.argmax(1)
            poisoned = ~data.is_clean[idx].to(rt.device, non_blocking=True)
            gt = data.gt_labels[idx].to(rt.device, non_blocking=True)
            hit, hit_gt = pred == y, pred == gt
            counts = torch.stack([hit.sum(), poisoned.sum(), (hit & poisoned).sum(), (hit_gt & poisoned).sum()])
        return loss, {"counts": counts}

    n = len(data.labels)
    r = sgd_epoch(model, n, batch_size, g, optimizer, step, ascent=ascent, device=data.labels.device, desc=desc)
    correct, n_poison, asr, racc = r["stats"].get("counts", [0, 0, 0, 0])
    pct = lambda a, b: 100.0 * a / b if b else float("nan")  # noqa: E731
    return {"Train_Loss": r["loss"], "Train_ACC": pct(correct, n), "Train_ASR": pct(asr, n_poison),
            "Train_R-ACC": pct(racc, n_poison)}


# ----------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model, images, rt, batch_size=512, features=False):
    """Logits (or features) of uint8 images, eval mode, in batches; returned on the host as float32."""
    model.eval()
    fn = model.features if features else model
    out = []
    for i in range(0, len(images), batch_size):
        with rt.autocast(inference=True):
            out.append(fn(rt.images(images[i:i + batch_size])).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model, tests, rt, target_label=0):
    """ACC on the clean test split, ASR / R-ACC on the backdoor test set, ASR0 on its clean versions.

    Also returns ACC on the non-target test images (the set the original code reported ACC on).
    All metrics in percent.
    """
    cl = predict(model, tests.clean_images, rt)
    bd = predict(model, tests.bd_images, rt)
    bd0 = cl[tests.bd_source]  # the untriggered backdoor images are clean test images: no third pass
    pct = lambda m: 100.0 * m.float().mean().item() if len(m) else float("nan")  # noqa: E731
    nontarget = tests.clean_labels != target_label
    return {
        "Test_Loss_cl": F.cross_entropy(cl, tests.clean_labels).item(),
        "Test_ACC": pct(cl.argmax(1) == tests.clean_labels),
        "Test_ACC_nontarget": pct(cl.argmax(1)[nontarget] == tests.clean_labels[nontarget]),
        "Test_Loss_bd": F.cross_entropy(bd, tests.bd_targets).item() if len(bd) else float("nan"),
        "Test_ASR": pct(bd.argmax(1) == tests.bd_targets),
        "Test_ASR0": pct(bd0.argmax(1) == tests.bd_targets),
        "Test_R-ACC": pct(bd.argmax(1) == tests.bd_gt_labels),
    }


def format_metrics(m):
    return (f"ACC {m['Test_ACC']:.2f}  ASR {m['Test_ASR']:.2f} (ASR0 {m['Test_ASR0']:.2f})  "
            f"R-ACC {m['Test_R-ACC']:.2f}")


# ----------------------------------------------------------------------------------- optimisation
def make_optimizer(args, params, lr=None):
    return torch.optim.SGD(params, lr=args.lr if lr is None else lr, momentum=args.momentum,
                           weight_decay=args.weight_decay)


def make_scheduler(optimizer, args, kind, period=None):
    """The per-epoch lr schedules: 'cosine' (CosineAnnealingLR over ``period`` epochs, default
    --cosine_period); 'step' (x --gamma at --schedule); 'constant'."""
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=period or args.cosine_period)
    if kind == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.schedule, gamma=args.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)


def warmup_cosine_lr(epoch, epochs, base_lr, warm_epochs=10, warmup_from=0.01, min_ratio=0.001):
    """lr at a (fractional) epoch: linear warm-up from ``warmup_from`` to ``base_lr`` over
    ``warm_epochs``, then a half cosine from ``base_lr`` down to ``base_lr * min_ratio`` at ``epochs``.
    Evaluated every step (SupContrast changes the cosine once per epoch; same curve, smoother)."""
    eta_min = base_lr * min_ratio
    if epoch < warm_epochs:
        return warmup_from + (base_lr - warmup_from) * epoch / warm_epochs
    progress = min((epoch - warm_epochs) / max(epochs - warm_epochs, 1e-8), 1.0)
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * progress)) / 2


# ----------------------------------------------------------------------------------- whole runs
def start_checkpoint(args, run_dir, init_checkpoint=None, resume_checkpoint=None, *, newest=latest_checkpoint,
                     made=("*.tar",)):
    """The one start rule of every training run: decide where it starts, without ever overwriting
    earlier work silently, and lock ``run_dir`` for this process (a second process on it stops with a
    one-line error).

    Returns (checkpoint dict or None, is_resume). resume_checkpoint (or --resume: ``newest(run_dir)``,
    by default the highest-numbered checkpoint) continues a run at its next epoch; init_checkpoint
    (the noTrans model a fine-tuning starts from) starts a new run from that state. A folder that
    holds a run needs --resume or --overwrite (a script without --resume: --overwrite); a new run
    first removes the files of the earlier one (the ``made`` patterns). Nothing is written or removed
    before the checks pass and the lock is held.
    """
    existing = newest(run_dir)
    resume = getattr(args, "resume", False)
    if resume_checkpoint is not None:
        start = read_checkpoint(resume_checkpoint), True
    elif resume:
        if existing is None:
            raise UserError(f"--resume: no checkpoint in {run_dir}")
        start = None, True
    elif existing is not None and not args.overwrite:
        how = "pass --resume to continue or --overwrite to start again" if hasattr(args, "resume") \
            else "pass --overwrite to start again"
        raise UserError(f"{run_dir} already holds a run (up to {existing.name}); {how}")
    else:
        start = (read_checkpoint(init_checkpoint) if init_checkpoint is not None else None), False
    if start[0] is not None:
        check_compatible(start[0], args, MODEL_KEYS + ATTACK_KEYS, "the checkpoint")
    lock_folder(run_dir)
    if resume and resume_checkpoint is None:  # read once the lock is held: the newest one now
        return read_checkpoint(newest(run_dir)), True
    if not start[1]:
        for pattern in made:
            for p in run_dir.glob(pattern):
                p.unlink()
    return start


def save_poison_indices(run_dir, train_set, overwrite=False):
    """Keep the poisoned indices beside the run's outputs; refuse to mix two different sets."""
    path = run_dir / "poison_indices.npy"
    run_dir.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        old = np.load(path, allow_pickle=False)
        if not np.array_equal(old, train_set.poison_indices):
            raise UserError(f"{path} holds other poisoned indices than this run's; use another --save_root "
                            "or --overwrite")
        return
    np.save(path, train_set.poison_indices)


def fit(args, model, train_set, tests, rt, run_dir, *, augment=None, criterion=cross_entropy,
        schedule="step", init_checkpoint=None, resume_checkpoint=None, desc="train", start=None):
    """Train ``model`` for args.epochs epochs, saving a CSV row and then ``<epoch>.tar`` each epoch.

    init_checkpoint: a checkpoint to start from (model, optimiser and scheduler state) as a new run;
    resume_checkpoint / --resume: continue a run at the epoch after the checkpoint's, with the
    batch-order and augmentation random state the checkpoint saved, so that the resumed run gives
    the model an uninterrupted run gives, bit for bit. start: start_checkpoint's result, when the
    caller already took it (and with it the run folder's lock).
    """
    ckpt, resumed = start or start_checkpoint(args, run_dir, init_checkpoint, resume_checkpoint)
    try:
        return _fit(args, model, train_set, tests, rt, run_dir, augment, criterion, schedule, desc, ckpt, resumed)
    finally:
        unlock_folder(run_dir)


def _fit(args, model, train_set, tests, rt, run_dir, augment, criterion, schedule, desc, ckpt, resumed):
    loop = {"schedule": schedule, "augment": getattr(augment, "__name__", str(augment)),
            "criterion": criterion.__name__}  # which step's loop wrote a checkpoint
    if resumed and ckpt.get("loop", loop) != loop:
        raise UserError(f"the checkpoint was written by another step ({ckpt['loop']}); "
                        "resume a run only with the script that made it")
    model = prepare_model(model, rt)
    optimizer = make_optimizer(args, model.parameters())
    scheduler = make_scheduler(optimizer, args, schedule)
    start = 0
    if ckpt is not None:
        check_compatible(ckpt, args, MODEL_KEYS + ATTACK_KEYS, "the checkpoint")
        load_weights(model, ckpt)
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
        if "scheduler" in ckpt:
            scheduler.load_state_dict(ckpt["scheduler"])
        start = ckpt["epoch"] + 1 if resumed else 0
    save_poison_indices(run_dir, train_set, overwrite=args.overwrite and not resumed)
    log_path = args.log or run_dir / "log.csv"
    logger = CSVLogger(log_path, TRAIN_COLUMNS, append=resumed, resume_after=start - 1 if resumed else None,
                       recipe=getattr(args, "recipe", None))
    data = place_train_data(rt, train_set.images, train_set.labels, train_set.gt_labels, train_set.is_clean)
    g = generator(args.seed)
    if resumed:
        restore_rng(g, ckpt, "the checkpoint")
    print(f"run folder: {run_dir}")
    for epoch in range(start, args.epochs):
        t0 = time.time()
        lr = optimizer.param_groups[0]["lr"]
        train_metrics = train_epoch(model, data, optimizer, rt, g, criterion, augment, args.batch_size,
                                    desc=f"{desc} {epoch}")
        scheduler.step()
        test_metrics = evaluate(model, tests, rt, args.target_label)
        row = {"Epoch": epoch, **train_metrics, **test_metrics, "LR": lr, "Seconds": time.time() - t0}
        logger.write(row)
        print(f"epoch {epoch:3d}  loss {train_metrics['Train_Loss']:.4f}  {format_metrics(test_metrics)}  "
              f"({row['Seconds']:.1f} s)")
        save_checkpoint(run_dir / f"{epoch}.tar", args, model, optimizer, scheduler, epoch, loop=loop,
                        rng_state=g.get_state())
        _prune(run_dir, epoch - 1, args)
    return model


def restore_rng(g, ckpt, what):
    """Continue the random stream (batch order, augmentation) where the checkpoint's run left it."""
    if "rng_state" not in ckpt:
        raise UserError(f"{what} holds no random state to resume from; start the run again with --overwrite")
    g.set_state(ckpt["rng_state"])


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def clean_model_path(args):
    """The clean model the CL attack perturbs its images against (UserError when there is none)."""
    path = args.clean_model or latest_checkpoint(clean_model_dir(args))
    if path is None:
        raise UserError(f"the CL attack needs a clean model: none in {clean_model_dir(args)}; run "
                        "train_clean_withTrans.py with the same --dataset/--data_file or pass --clean_model")
    return path


def load_attack_data(args, rt, poison=True, raw=None):
    """The poisoned training set and test sets of args' attack; CL first loads its clean model.
    raw: the clean arrays (dataloader_bd.load_raw), when the caller has loaded them already."""
    clean_model = None
    if poison and args.trigger_type == "fourCornerTrigger":
        clean_model, _ = model_from_checkpoint(clean_model_path(args))
        clean_model = prepare_model(clean_model, rt, compile=False)  # a few forward passes: not worth compiling
    return build_datasets(args, clean_model, raw=raw, poison=poison)


def train_model(args, script, run_dir, *, augment=None, schedule="step", poison=True, criterion=cross_entropy,
                init_checkpoint=None):
    """The whole recipe of a training script: check the input, build data and model, then fit().

    noTrans, withTrans, the clean model and the intra-class fine-tuning differ only in these
    keyword arguments.
    """
    from models import get_network
    from utils.args import resolve_device, validate_args
    from utils.logger import print_header
    validate_args(args)
    rt = make_runtime(args, resolve_device(args))
    if init_checkpoint is not None:  # check the starting point before any output is written
        check_compatible(read_checkpoint(init_checkpoint), args, MODEL_KEYS + ATTACK_KEYS, init_checkpoint)
    raw = load_raw(args)  # a bad data file (or a missing CL clean model) stops the run before it writes
    if poison and args.trigger_type == "fourCornerTrigger":
        clean_model_path(args)
    # the run folder is decided and locked before the poisoned set is built: a second process stops at once
    start = start_checkpoint(args, run_dir, init_checkpoint, None if init_checkpoint else args.checkpoint_load)
    print_header(script, args)
    seed_everything(args.seed)
    try:
        train_set, tests = load_attack_data(args, rt, poison, raw)
    except BaseException:
        unlock_folder(run_dir)
        raise
    print(f"{len(train_set)} training samples, {len(train_set.poison_indices)} poisoned; "
          f"{len(tests.clean_labels)} clean / {len(tests.bd_targets)} backdoor test images; device {rt.device}")
    return fit(args, get_network(args), train_set, tests, rt, run_dir, augment=augment, criterion=criterion,
               schedule=schedule, start=start)


def _prune(run_dir, epoch, args):
    """Keep every --save_freq-th epoch checkpoint (the newest one is always kept)."""
    if epoch >= 0 and (epoch + 1) % max(args.save_freq, 1) != 0:
        (run_dir / f"{epoch}.tar").unlink(missing_ok=True)


def place_train_data(rt, images, labels, gt_labels, is_clean):
    """The tensors train_epoch expects, placed on the device (or pinned, for large datasets)."""
    from types import SimpleNamespace
    return SimpleNamespace(images=rt.place(images), labels=rt.place(labels), gt_labels=rt.place(gt_labels),
                           is_clean=rt.place(is_clean))
