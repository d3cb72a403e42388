"""Paper-scale cost: images/s of every training and inference step of the method, and the minutes
that the paper's CIFAR-10 table (7 attacks, the ``paper`` recipe of utils/recipes.py) takes at
those rates.

What is measured, each with the project's own functions, on synthetic uint8 32x32 images, the
network at --model / --width (the paper: ResNet-18, width 64), at the batch size and optimiser
settings that each step script takes by default under the paper recipe:

- withTrans: utils.train.train_epoch with the training augmentation (also CL's clean model);
- noTrans: train_epoch without augmentation;
- finetune: train_epoch with the L_intra criterion (utils.fct.intra_class_criterion);
- eval: utils.train.evaluate (forward passes of the clean and the backdoor test images);
- fct: utils.fct.fct_values (forward passes of x and tau(x) with the recipe's tau);
- dbr: one unlearning (gradient ascent) and one relearning train_epoch with the augmentation;
- st_extractor: the SupCon step of ST/train_extractor.py (two views of each image through SupConNet,
  the semi-supervised loss) in utils.train.sgd_epoch;
- st_classifier: the mixed cross-entropy step of ST/train_classifier.py (frozen encoder, linear layer);
- st_eval: evaluate() of the D-ST model (its encoder has no max-pool: 4x the activations).

Each step first runs --warmup untimed batches, then --batches timed ones (eval and dbr time
--batches batches of each of their two parts); the clock is the wall clock, with CUDA synchronised
on both sides of the timed batches. The rate does not depend on the weights, so every network is freshly initialised.

--jobs K also starts K copies of the measurement as concurrent subprocesses; all K start each step
together and report their images/s; the aggregate rate is their sum. On a CPU each copy has one
torch thread; on CUDA they share the GPU (and the CPU cores evenly).

Projection: images of each step in the whole table = epochs (from the paper recipe) x images per
epoch x the attacks that run it; minutes = images / aggregate images/s, as if K runs of different
attacks always kept the device busy (wall minutes of the table = total work / aggregate rate; the
waits between dependent steps and the idle slots of a last round with fewer than K runs are not
counted, so the figure is a lower bound).

  python benchmarks/paper_scale.py --device cuda --width 64 --jobs 4      # on a GPU
  python benchmarks/paper_scale.py --device cpu --width 16 --threads 2    # on a CPU (slow: minutes)
  python benchmarks/paper_scale.py --device cpu --width 8 --batches 2 --warmup 1   # seconds per step

Reading the output: one markdown table, a row per step. "epochs x runs" is the recipe's epoch count
(fct: passes over the training set; eval rows: evaluations) times the attacks that run the step;
"images (M)" the images that step processes in the table; the two img/s columns the rate of one
job alone and the summed rate of K concurrent jobs; "minutes" = images / the K-job rate; "share"
that step's part of the total. Below it: the total in hours (GPU-hours on CUDA: hours of the one
GPU with its K jobs), the total if one job ran at a time, and the steps that take most of it.
"""
import argparse
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the step scripts live at the repository root

import importlib  # noqa: E402

import torch  # noqa: E402

from benchmarks.throughput import timed  # noqa: E402
from dataloader_bd import TestSets, make_synthetic  # noqa: E402
from models import get_network  # noqa: E402
from utils import recipes  # noqa: E402
from utils.args import (PAPER_ATTACKS, describe_args, nonneg_int, positive_int, resolve_device,  # noqa: E402
                        validate_args)
from utils.args import build_parser as shared_parser  # noqa: E402
from utils.augment import train_augmentation  # noqa: E402
from utils.errors import run_main  # noqa: E402
from utils.fct import fct_values, intra_class_criterion  # noqa: E402
from utils.supcon import PROJECTION_DIM, FrozenEncoderClassifier, SupConNet, build_encoder  # noqa: E402
from utils.train import (cross_entropy, evaluate, generator, make_optimizer, make_runtime,  # noqa: E402
                         place_train_data, predict, prepare_model, sgd_epoch, train_epoch, warmup_cosine_lr)

# CIFAR-10's sizes
TRAIN_IMAGES = 50_000    # the training split
TEST_IMAGES = 10_000     # the test split (1,000 per class): every evaluation's clean test set
BD_TEST_IMAGES = 9_000   # the non-target test images: the backdoor test set of all2one and clean-label attacks
#                          (all2all triggers all TEST_IMAGES)
DATASET = "cifar10"      # the dataset facts (classes, normalisation, augmentation) of the projected table
RECIPE = "paper"
# Delta of every training image is computed twice per attack: calculate_consistency.py, then
# separate_samples.py recomputes it (same seed and tau) to split the set
FCT_PASSES = 2
CL_TRIGGER = "fourCornerTrigger"  # the CL attack: it also trains a clean model (train_clean_withTrans.py)

MEASURED = ("withTrans", "noTrans", "finetune", "eval", "fct", "dbr", "st_extractor", "st_classifier", "st_eval")
BARRIER_TIMEOUT = 1800  # seconds a worker waits for its siblings at a step, at most


def build_parser():
    p = shared_parser(__doc__, groups=("model",))
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    g = p.add_argument_group("benchmark")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--amp", default="auto", choices=("auto", "on", "off"),
                   help="bf16 autocast, as the step scripts' --amp (auto: on CUDA; forward-only passes and the D-ST "
                        "extractor also on a CPU with native bf16)")
    g.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile, as the step scripts' --compile (auto: the D-ST extractor on a CPU); its "
                        "compilation falls in the untimed --warmup batches (keep --warmup >= 1 with it)")
    g.add_argument("--seed", type=nonneg_int, default=0, help="of the weights, the batch order and the augmentation")
    g.add_argument("--batches", type=positive_int, default=20, help="timed batches per step")
    g.add_argument("--warmup", type=nonneg_int, default=3, help="untimed batches per step first")
    g.add_argument("--jobs", type=positive_int, default=1,
                   help="also measure K concurrent copies (subprocesses) and project with their summed rate")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads of the one-job measurement (default: torch's choice; each of K > 1 "
                        "jobs on a CPU has 1)")
    # a worker of --jobs K: the folder of its step barrier, and its rank
    g.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    g.add_argument("--_rank", type=nonneg_int, default=0, help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------------- settings
def script_args(step):
    """Step ``step``'s script arguments under the paper recipe, as that script parses its defaults."""
    module = importlib.import_module(recipes.STEPS[step][:-3].replace("/", "."))
    return module.build_parser().parse_args(["--recipe", RECIPE])


def epochs(step):
    return recipes.settings(RECIPE, step)["epochs"]


def _floor(x):
    return math.floor(round(x, 9))


def split_sizes():
    """|D_c|, |D_p| of the paper's split of the CIFAR-10 training set (floor(alpha N) each)."""
    s = recipes.settings(RECIPE, "split")
    return _floor(s["clean_ratio"] * TRAIN_IMAGES), _floor(s["poison_ratio"] * TRAIN_IMAGES)


def test_images(target_type):
    """Images one evaluation reads: the clean test split and the backdoor test set."""
    return TEST_IMAGES + (TEST_IMAGES if target_type == "all2all" else BD_TEST_IMAGES)


def paper_work():
    """The work of the paper's CIFAR-10 table: step -> {kind (the measured rate it runs at), epochs,
    runs, images, and 'per_run' (epochs or evaluations of each attack, for the table)}."""
    attacks = list(PAPER_ATTACKS.values())
    n_c, n_p = split_sizes()
    n_runs, n_cl = len(attacks), sum(trigger == CL_TRIGGER for _, trigger, _ in attacks)
    work = {}

    def add(step, kind, per_epoch, n_epochs, runs):
        work[step] = {"kind": kind, "epochs": n_epochs, "runs": runs, "per_run": Counter({n_epochs: runs}),
                      "images": n_epochs * per_epoch * runs}

    add("clean_model", "withTrans", TRAIN_IMAGES, epochs("clean_model"), n_cl)
    add("withTrans", "withTrans", TRAIN_IMAGES, epochs("withTrans"), n_runs)
    add("noTrans", "noTrans", TRAIN_IMAGES, epochs("noTrans"), n_runs)
    add("finetune", "finetune", TRAIN_IMAGES, epochs("finetune"), n_runs)
    add("fct", "fct", TRAIN_IMAGES, FCT_PASSES, n_runs)
    add("dbr", "dbr", n_c + n_p, epochs("dbr"), n_runs)                 # unlearn D_p + relearn D_c
    add("st_extractor", "st_extractor", TRAIN_IMAGES, epochs("st_extractor"), n_runs)  # D_c u D_p u D_u
    add("st_classifier", "st_classifier", n_c + n_p, epochs("st_classifier"), n_runs)  # D_c u D_p
    # evaluations: after every epoch of fit() (clean model, withTrans, noTrans, finetune), one of the
    # backdoored model as D-BR starts and one after each D-BR epoch; of the D-ST model after every
    # classifier epoch and once by ST/test.py
    for step, count in (("eval", lambda cl: epochs("withTrans") + epochs("noTrans") + epochs("finetune")
                         + epochs("dbr") + 1 + (epochs("clean_model") if cl else 0)),
                        ("st_eval", lambda cl: epochs("st_classifier") + 1)):
        per_run = Counter(count(trigger == CL_TRIGGER) for _, trigger, _ in attacks)
        images = sum(count(trigger == CL_TRIGGER) * test_images(target) for target, trigger, _ in attacks)
        work[step] = {"kind": step, "epochs": sum(k * v for k, v in per_run.items()), "runs": n_runs,
                      "per_run": per_run, "images": images}
    return work


def project(work, alone, jobs):
    """Minutes of each step at the K-job rate ``jobs[kind]`` (img/s); ``alone``: the one-job rates."""
    rows = {}
    for step, w in work.items():
        rate = jobs[w["kind"]]
        rows[step] = {**w, "per_run": dict(w["per_run"]), "ips_alone": alone[w["kind"]], "ips_jobs": rate,
                      "minutes": w["images"] / rate / 60, "minutes_alone": w["images"] / alone[w["kind"]] / 60}
    total = sum(r["minutes"] for r in rows.values())
    for r in rows.values():
        r["share"] = r["minutes"] / total
    return rows, total


# ----------------------------------------------------------------------------------- the steps
class Bench:
    """What the steps share: the runtime, the synthetic images, the network settings."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.rt = make_runtime(args, device)
        self.rt_extractor = make_runtime(args, device, extractor=True)  # as ST/train_extractor.py
        self.meta = describe_args(args)
        most = max(args.batches, args.warmup, 1) * 512
        self.images, self.labels, _, _ = make_synthetic(n_train=most, n_test=1)
        g = generator(args.seed)
        self.poisoned = torch.rand(most, generator=g) < recipes.settings(RECIPE, "split")["poison_ratio"]
        self.trusted = torch.rand(most, generator=g) < recipes.settings(RECIPE, "split")["clean_ratio"]

    def take(self, n, *tensors):
        """The first n synthetic samples (cycled), on the host."""
        idx = torch.arange(n) % len(self.labels)
        return [t[idx] for t in tensors]

    def train_data(self, n):
        images, labels, poisoned = self.take(n, self.images, self.labels, self.poisoned)
        return place_train_data(self.rt, images, labels, labels.clone(), ~poisoned)

    def test_sets(self, n):
        images, labels = self.take(n, self.images, self.labels)
        return TestSets(images, labels, images.flip(0), torch.zeros_like(labels), labels.flip(0), torch.arange(n))

    def st_data(self, n):
        images, labels, trusted, poisoned = self.take(n, self.images, self.labels, self.trusted, self.poisoned)
        return SimpleNamespace(images=self.rt.place(images), labels=self.rt.place(labels),
                               trusted=self.rt.place(trusted), in_poison_set=self.rt.place(poisoned & ~trusted))

    def classifier(self):
        torch.manual_seed(self.args.seed)
        return prepare_model(get_network(self.args), self.rt)

    def encoder(self):
        torch.manual_seed(self.args.seed)
        return build_encoder(self.meta)


# each factory builds its network and optimiser once and returns prepare(n_batches) -> run() -> images processed
def _counting(fn, images):
    def run():
        fn()
        return images
    return run


def _train_step(b, step, augment=None, criterion=cross_entropy):
    sargs = script_args(step)
    bs, model = sargs.batch_size, b.classifier()
    optimizer, g = make_optimizer(sargs, model.parameters()), generator(b.args.seed)

    def prepare(n):
        data = b.train_data(n * bs)
        return _counting(lambda: train_epoch(model, data, optimizer, b.rt, g, criterion, augment, bs), n * bs)
    return prepare


def step_withTrans(b):
    return _train_step(b, "withTrans", augment=train_augmentation(DATASET))


def step_noTrans(b):
    return _train_step(b, "noTrans")


def step_finetune(b):  # finetune_attack_noTrans.py: fit() with criterion=intra_class_criterion, no augmentation
    return _train_step(b, "finetune", criterion=intra_class_criterion)


def _eval_step(b, model):
    bs = inspect.signature(predict).parameters["batch_size"].default  # what evaluate() uses

    def prepare(n):
        tests = b.test_sets(n * bs)  # on the host, as load_attack_data leaves them
        return _counting(lambda: evaluate(model, tests, b.rt), 2 * n * bs)
    return prepare


def step_eval(b):
    return _eval_step(b, b.classifier())


def step_st_eval(b):
    sargs = script_args("st_test")
    return _eval_step(b, prepare_model(FrozenEncoderClassifier(b.encoder(), b.args.num_classes,
                                                               sargs.normalize_features), b.rt))


def step_fct(b):
    sargs = script_args("fct")
    bs, model = sargs.batch_size, b.classifier()

    def prepare(n):
        (images,) = b.take(n * bs, b.images)  # on the host, as load_attack_data leaves the training set
        return _counting(lambda: fct_values(model, images, b.rt, (sargs.trans1, sargs.trans2), b.args.seed, bs,
                                            sargs.fct_draws), n * bs)
    return prepare


def step_dbr(b):
    """unlearn_relearn.py's epoch: a gradient-ascent pass on D_p, a descent pass on D_c (both augmented)."""
    sargs = script_args("dbr")
    bs, model, augment = sargs.batch_size, b.classifier(), train_augmentation(DATASET)
    optimizer, g = make_optimizer(sargs, model.parameters()), generator(b.args.seed)

    def prepare(n):
        poison, clean = b.train_data(n * bs), b.train_data(n * bs)

        def run():
            train_epoch(model, poison, optimizer, b.rt, g, augment=augment, batch_size=bs, ascent=True)
            train_epoch(model, clean, optimizer, b.rt, g, augment=augment, batch_size=bs)
            return 2 * n * bs
        return run
    return prepare


def step_st_extractor(b):
    from ST.train_extractor import contrastive_step
    sargs, rt = script_args("st_extractor"), b.rt_extractor
    bs, n_epochs = sargs.batch_size, epochs("st_extractor")
    torch.manual_seed(b.args.seed)
    model = prepare_model(SupConNet(b.encoder(), PROJECTION_DIM), rt)
    optimizer, g = make_optimizer(sargs, model.parameters()), generator(b.args.seed)
    warm = min(sargs.warm_epochs, n_epochs / 2)

    def lr_at(t):
        return warmup_cosine_lr(t, n_epochs, sargs.lr, warm, sargs.warmup_from, sargs.min_lr_ratio)

    def prepare(n):
        data = b.st_data(n * bs)
        step = contrastive_step(model, data, rt, g, sargs.temp)
        return _counting(lambda: sgd_epoch(model, n * bs, bs, g, optimizer, step, lr_at=lr_at, desc="SupCon"), n * bs)
    return prepare


def step_st_classifier(b):
    from ST.train_classifier import mixed_ce_step
    sargs = script_args("st_classifier")
    bs = sargs.batch_size
    model = prepare_model(FrozenEncoderClassifier(b.encoder(), b.args.num_classes, sargs.normalize_features), b.rt)
    optimizer = torch.optim.SGD(model.linear.parameters(), lr=sargs.lr, momentum=sargs.momentum,
                                weight_decay=sargs.weight_decay)  # as ST/train_classifier.py
    g = generator(b.args.seed)

    def prepare(n):
        data = b.st_data(n * bs)
        step = mixed_ce_step(model, data, b.rt, g, sargs.lambda_p)
        return _counting(lambda: sgd_epoch(model, n * bs, bs, g, optimizer, step, desc="linear"), n * bs)
    return prepare


FACTORIES = {name: globals()[f"step_{name}"] for name in MEASURED}


# ----------------------------------------------------------------------------------- measuring
def barrier(folder, name, rank, peers):
    """Wait until all ``peers`` workers have reached ``name`` (a file per worker in ``folder``)."""
    Path(folder, f"{name}.{rank}").touch()
    deadline = time.time() + BARRIER_TIMEOUT
    while len(list(Path(folder).glob(f"{name}.*"))) < peers:
        if time.time() > deadline:
            raise RuntimeError(f"worker {rank}: the other workers did not reach {name} in {BARRIER_TIMEOUT} s")
        time.sleep(0.005)


def measure(args, device, sync_folder=None):
    """{step: {images, seconds, ips, start, end}} of every measured step in this process."""
    b = Bench(args, device)
    out = {}
    for name in MEASURED:
        out[name] = measure_step(b, name, sync_folder)
        if device.type == "cuda":  # the step's network and data are gone: give their memory back
            torch.cuda.empty_cache()
    return out


def measure_step(b, name, sync_folder=None):
    """Warm-up, then the timed batches of one step (a worker starts and ends them with its siblings)."""
    args = b.args
    prepare = FACTORIES[name](b)
    if args.warmup:
        prepare(args.warmup)()
    run, done = prepare(args.batches), {}
    if sync_folder:
        barrier(sync_folder, name, args._rank, args.jobs)
    start = time.time()
    wall, _ = timed(lambda: done.setdefault("images", run()), b.device)
    end = time.time()
    if sync_folder:  # nobody warms up the next step while a sibling still times this one
        barrier(sync_folder, name + ".end", args._rank, args.jobs)
    return {"images": done["images"], "seconds": wall, "ips": done["images"] / wall, "start": start, "end": end}


def worker_command(args, device, folder, rank):
    return [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--width", str(args.width),
            "--device", device.type, "--amp", args.amp, "--compile", args.compile, "--seed", str(args.seed), "--batches", str(args.batches),
            "--warmup", str(args.warmup), "--jobs", str(args.jobs), "--_worker", folder, "--_rank", str(rank)]


def run_jobs(args, device):
    """K concurrent workers of measure(); returns their results (one dict per worker)."""
    k = args.jobs
    threads = 1 if device.type == "cpu" else max(1, (os.cpu_count() or 1) // k)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory(prefix="paper_scale_") as folder:
        procs, logs = [], []
        for rank in range(k):
            out, err = Path(folder, f"out{rank}.json"), Path(folder, f"err{rank}.txt")
            logs.append((out, err))
            with open(out, "w") as fo, open(err, "w") as fe:
                procs.append(subprocess.Popen(worker_command(args, device, folder, rank), stdout=fo, stderr=fe,
                                              env=env, cwd=folder))
        try:
            while any(p.poll() is None for p in procs):
                for p, (_, err) in zip(procs, logs):
                    if p.poll() not in (None, 0):
                        raise RuntimeError(f"worker pid {p.pid} failed (exit {p.returncode}):\n"
                                           + err.read_text()[-2000:])
                time.sleep(0.05)
            for p, (_, err) in zip(procs, logs):
                if p.returncode != 0:
                    raise RuntimeError(f"worker pid {p.pid} failed (exit {p.returncode}):\n" + err.read_text()[-2000:])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        results = []
        for p, (out, _) in zip(procs, logs):
            lines = [line for line in out.read_text().splitlines() if line.strip()]
            results.append({"pid": p.pid, **json.loads(lines[-1])})
        return results


def aggregate(workers):
    """Per step: the sum of the workers' img/s, and the images of all over the span from the first
    start to the last end (lower when the workers did not overlap fully)."""
    out = {}
    for name in MEASURED:
        parts = [w["steps"][name] for w in workers]
        span = max(p["end"] for p in parts) - min(p["start"] for p in parts)
        out[name] = {"ips": sum(p["ips"] for p in parts), "span_ips": sum(p["images"] for p in parts) / span,
                     "per_worker": [p["ips"] for p in parts]}
    return out


# ----------------------------------------------------------------------------------- report
def _per_run(counts):
    return " + ".join(f"{e} x {r}" for e, r in sorted(counts.items()))


def print_report(rows, total, total_alone, k, device, args, note):
    print(f"{args.model} width {args.width}, device {note}, amp {args.amp}, compile {args.compile}, {args.batches} timed batches "
          f"after {args.warmup} per step; projection: CIFAR-10, the {RECIPE} recipe, {len(PAPER_ATTACKS)} attacks")
    print()
    jobs = f"{k} jobs, sum" if k > 1 else "1 job"
    print(f"| step | epochs x runs | images (M) | img/s (alone) | img/s ({jobs}) | minutes for the table | share |")
    print("|---|---|---|---|---|---|---|")
    for step, r in rows.items():
        print(f"| {step} | {_per_run(r['per_run'])} | {r['images'] / 1e6:.2f} | {r['ips_alone']:.0f} | "
              f"{r['ips_jobs']:.0f} | {r['minutes']:.1f} | {100 * r['share']:.1f} % |")
    unit = "GPU-hours" if device.type == "cuda" else "hours"
    print(f"| total | | {sum(r['images'] for r in rows.values()) / 1e6:.2f} | | | {total:.1f} | 100 % |")
    print()
    print(f"total: {total:.1f} min = {total / 60:.2f} {unit} with {k} concurrent job(s); one job at a time: "
          f"{total_alone / 60:.2f} {unit}")
    print("clean_model (CL's clean model) runs at the withTrans rate; fct: passes over the training set "
          "(calculate_consistency.py, separate_samples.py); eval: evaluations of the classifier after every "
          "epoch of clean_model, withTrans, noTrans, finetune and dbr, and one as dbr starts; st_eval: of the "
          "D-ST model after every st_classifier epoch and once by ST/test.py")
    top = sorted(rows, key=lambda s: -rows[s]["minutes"])
    print("where the time goes: " + ", ".join(f"{s} {100 * rows[s]['share']:.0f} %" for s in top[:3]))


def main(args):
    args.dataset = DATASET
    validate_args(args)
    device = resolve_device(args)
    if args._worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        result = {"steps": measure(args, device, args._worker), "threads": torch.get_num_threads()}
        print(json.dumps(result))
        return result
    if args.threads:
        torch.set_num_threads(args.threads)
    alone = measure(args, device)
    workers = run_jobs(args, device) if args.jobs > 1 else []
    jobs = aggregate(workers) if workers else {n: {"ips": alone[n]["ips"]} for n in MEASURED}
    rows, total = project(paper_work(), {n: alone[n]["ips"] for n in MEASURED}, {n: jobs[n]["ips"] for n in MEASURED})
    total_alone = sum(r["minutes_alone"] for r in rows.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print_report(rows, total, total_alone, args.jobs, device, args, name)
    for n in MEASURED:
        if workers and jobs[n]["span_ips"] < 0.9 * jobs[n]["ips"]:
            print(f"note: {n}'s {args.jobs} jobs overlapped only in part: {jobs[n]['span_ips']:.0f} img/s over the "
                  f"whole span against {jobs[n]['ips']:.0f} summed")
    top = max(rows, key=lambda s: rows[s]["minutes"])
    return {"device": name, "jobs": args.jobs, "alone": alone, "jobs_rate": jobs, "workers": workers,
            "projection": rows, "total_minutes": total, "total_minutes_alone": total_alone, "top": top}


if __name__ == "__main__":
    run_main(main, build_parser())
