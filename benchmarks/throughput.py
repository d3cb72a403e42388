"""Training throughput: the real training pass against the bare optimisation step.

"pipeline": images/s of ``utils.train.train_epoch`` over the poisoned training set with
``utils.augment.crop_flip`` (batch indexing, uint8 -> float, augmentation, forward, backward, step
and the per-batch metrics). "bare": images/s of forward + backward + step of the same network, batch
size and optimiser on one pre-made batch already on the device. Their ratio is the share of the
time the training loop spends on the network itself (goal: >= 0.85).

The two are measured alternately (one epoch, then as many bare steps) so a busy neighbour on a
shared machine slows both alike; the medians are reported, plus a markdown table row.

  python benchmarks/throughput.py --data_file ../shared/data/cifar10_subset.npz --width 16 --device cpu
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
from utils.train import generator, make_optimizer, make_runtime, prepare_model, train_epoch


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


def pipeline_epoch(model, data, optimizer, rt, g, batch_size):
    """Seconds for one training pass of train_epoch with crop_flip."""
    sync(rt.device)
    t0 = time.perf_counter()
    train_epoch(model, data, optimizer, rt, g, augment=crop_flip, batch_size=batch_size)
    sync(rt.device)
    return time.perf_counter() - t0


def bare_steps(model, x, y, optimizer, rt, steps):
    """Seconds for ``steps`` forward + backward + step on the pre-made batch (x, y)."""
    model.train()
    sync(rt.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        with rt.autocast():
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(rt.device)
    return time.perf_counter() - t0


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
    data = SimpleNamespace(images=rt.place(train_set.images), labels=rt.place(train_set.labels),
                           gt_labels=rt.place(train_set.gt_labels), is_clean=rt.place(train_set.is_clean))
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
    pipe, bare = [], []
    for _ in range(args.epochs):
        pipe.append(n / pipeline_epoch(model, data, optimizer, rt, g, bs))
        bare.append(steps * len(x) / bare_steps(model, x, y, optimizer, rt, steps))
    pipe_ips, bare_ips = statistics.median(pipe), statistics.median(bare)
    ratio = pipe_ips / bare_ips
    print(f"{args.model} width {args.width}, batch {bs}, {n} images/epoch ({args.dataset}"
          f"{', ' + args.data_file if args.data_file else ''}), device {device}, {torch.get_num_threads()} threads, "
          f"amp {rt.amp}")
    print("pipeline img/s per repeat: " + ", ".join(f"{v:.0f}" for v in pipe))
    print("bare     img/s per repeat: " + ", ".join(f"{v:.0f}" for v in bare))
    print()
    print("| device | model | width | batch | pipeline img/s | bare img/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {device.type} ({torch.get_num_threads()} thr) | {args.model} | {args.width} | {bs} | "
          f"{pipe_ips:.0f} | {bare_ips:.0f} | {ratio:.2f} |")
    if args.profile:
        profile_epoch(model, data, optimizer, rt, g, bs)
    return {"pipeline_ips": pipe_ips, "bare_ips": bare_ips, "ratio": ratio}


if __name__ == "__main__":
    run_main(main, build_parser())
