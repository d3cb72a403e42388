"""Training throughput: the real training pass against the bare optimisation step.

"pipeline": images/s of ``utils.train.train_epoch`` over the poisoned training set with
``utils.augment.crop_flip`` (batch indexing, uint8 -> float, augmentation, forward, backward, step
and the per-batch metrics). "bare": images/s of forward + backward + step of the same network, batch
size and optimiser on one pre-made batch already on the device. Their ratio is the share of the
time the training loop spends on the network itself (goal: >= 0.85).

The two are measured alternately (one epoch, then as many bare steps) so a busy neighbour on a
shared machine slows both alike; the medians are reported, plus a markdown table row. Both clocks
are shown: wall time, and this process's CPU time (on a CPU shared with other jobs the wall clock
swings by +-30 % from one repeat to the next; CPU time does not count the time others held the
cores, so its ratio is the steadier one). On a busy 2-core machine pass --threads 1: two torch
threads competing with a neighbour were measured 20x slower.

  python benchmarks/throughput.py --dataset cifar10 --data_file ../shared/data/cifar10_subset.npz --width 16 \
      --batch_size 128 --device cpu --threads 1 --epochs 5
  python benchmarks/throughput.py --profile        # where the pipeline's time goes (torch.profiler)
"""
import math
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from dataloader_bd import build_datasets
from models import get_network
from utils.args import build_parser as shared_parser
from utils.args import resolve_device, validate_args
from utils.augment import crop_flip
from utils.errors import run_main
from utils.train import generator, make_optimizer, make_runtime, place_train_data, prepare_model, train_epoch


def build_parser():
    p = shared_parser(__doc__, groups=("data", "attack", "model", "optim"), dataset="synthetic", width=16,
                      epochs=3, device="cpu")
    g = p.add_argument_group("benchmark")
    g.add_argument("--steps", type=int, default=None,
                   help="bare steps per repeat (default: the batches of one epoch)")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--profile", action="store_true", help="also profile one pipeline epoch and print the top ops")
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(wall seconds, CPU seconds of this process) of fn()."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def pipeline_epoch(model, data, optimizer, rt, g, batch_size):
    """One training pass of train_epoch with crop_flip."""
    train_epoch(model, data, optimizer, rt, g, augment=crop_flip, batch_size=batch_size)


def bare_steps(model, x, y, optimizer, rt, steps):
    """``steps`` forward + backward + step on the pre-made batch (x, y)."""
    model.train()
    for _ in range(steps):
        with rt.autocast():
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def subset(data, n):
    return SimpleNamespace(**{k: v[:n] for k, v in vars(data).items()})


def profile_epoch(model, data, optimizer, rt, g, batch_size, rows=15):
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_epoch(model, data, optimizer, rt, g, augment=crop_flip, batch_size=batch_size)
    key = "self_cuda_time_total" if rt.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def main(args):
    validate_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args)
    rt = make_runtime(args, device)
    train_set, _ = build_datasets(args)
    data = place_train_data(rt, train_set.images, train_set.labels, train_set.gt_labels, train_set.is_clean)
    n, bs = len(train_set), args.batch_size
    steps = args.steps or math.ceil(n / bs)
    torch.manual_seed(args.seed)
    model = prepare_model(get_network(args), rt)
    optimizer = make_optimizer(args, model.parameters())
    g = generator(args.seed)
    x = rt.images(train_set.images[:bs])                    # the pre-made batch of the bare loop
    y = train_set.labels[:bs].to(device)

    train_epoch(model, subset(data, args.warmup * bs), optimizer, rt, g, augment=crop_flip, batch_size=bs)
    bare_steps(model, x, y, optimizer, rt, args.warmup)
    pipe, bare = [], []   # (wall, cpu) seconds per repeat
    for _ in range(args.epochs):
        pipe.append(timed(lambda: pipeline_epoch(model, data, optimizer, rt, g, bs), device))
        bare.append(timed(lambda: bare_steps(model, x, y, optimizer, rt, steps), device))
    bare_images = steps * len(x)
    result = {}
    for i, clock in enumerate(("wall", "cpu")):
        result[clock] = (statistics.median(n / p[i] for p in pipe), statistics.median(bare_images / b[i] for b in bare))
    threads = torch.get_num_threads()
    print(f"{args.model} width {args.width}, batch {bs}, {n} images/epoch ({args.dataset}"
          f"{', ' + args.data_file if args.data_file else ''}), device {device}, {threads} threads, amp {rt.amp}")
    for i, clock in enumerate(("wall", "cpu")):
        print(f"img/s by {clock} clock, pipeline: " + ", ".join(f"{n / p[i]:.0f}" for p in pipe)
              + "; bare: " + ", ".join(f"{bare_images / b[i]:.0f}" for b in bare))
    print()
    print("| device | model | width | batch | clock | pipeline img/s | bare img/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for clock, (p, b) in result.items():
        print(f"| {device.type} ({threads} thr) | {args.model} | {args.width} | {bs} | {clock} | {p:.0f} | {b:.0f} "
              f"| {p / b:.2f} |")
    if args.profile:
        profile_epoch(model, data, optimizer, rt, g, bs)
    return {clock: {"pipeline_ips": p, "bare_ips": b, "ratio": p / b} for clock, (p, b) in result.items()}


if __name__ == "__main__":
    run_main(main, build_parser())
