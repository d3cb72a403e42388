"""Time the FCT metric (SPEC 3.3) over N training images: Delta for every image, batched, with
per-sample random rotation + translation, features of a CIFAR ResNet-18 in eval mode.

  python -m benchmarks.fct_speed --n 5170 --width 16 --device cpu      # the CPU figure of BENCHMARKS.md
  python -m benchmarks.fct_speed --n 50000 --width 64 --device cuda    # full scale on a GPU
Images are the --data_file's training images tiled to N (or random images); the timing does
not depend on the weights, so the network is freshly initialised.
"""
import argparse
import time

import numpy as np
import torch

from models import build_model
from utils.args import DATASETS
from utils.fct import fct_values
from utils.train import Runtime


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5170)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--data_file", default=None)
    p.add_argument("--repeats", type=int, default=3)
    return p


def main(opt):
    device = torch.device("cuda" if opt.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if opt.device == "auto" else opt.device))
    rt = Runtime(device, amp=device.type == "cuda")
    info = DATASETS["cifar10"]
    if opt.data_file:
        x = torch.from_numpy(np.load(opt.data_file)["x_train"]).permute(0, 3, 1, 2).contiguous()
        images = x.repeat((opt.n + len(x) - 1) // len(x), 1, 1, 1)[:opt.n]
    else:
        images = torch.randint(0, 256, (opt.n, 3, 32, 32), dtype=torch.uint8)
    if device.type == "cuda":
        images = images.to(device)
    model = build_model("resnet18", 10, info.mean, info.std, opt.width).to(device, memory_format=torch.channels_last)
    fct_values(model, images[:opt.batch_size], rt, seed=0, batch_size=opt.batch_size)  # warm-up
    times = []
    for r in range(opt.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        fct_values(model, images, rt, seed=r, batch_size=opt.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"| FCT | {name} | N {opt.n} | width {opt.width} | batch {opt.batch_size} | "
          f"best {min(times):.2f} s | mean {np.mean(times):.2f} s |")
    return min(times)


if __name__ == "__main__":
    main(build_parser().parse_args())
