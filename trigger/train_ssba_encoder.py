"""Train the SSBA encoder (StegaStamp-style) whose residual is the SSBA trigger (SPEC section 1, SSBA).

The encoder takes an image x in [0, 1] and a bit string m and outputs a residual r(x, m); the
decoder reads m back from the encoded image x' = clamp(x + r, 0, 1), rounded to uint8 as the
poisoned images are (straight-through gradient). Loss, per batch of random bit strings:

    L = BCE(decoder(x'), m) + lambda(t) * mean((x' - x)^2)           (pixels in [0, 1])

lambda(t) is 0 for the first --l2_start share of the steps (the bits are learned first), then rises
linearly to --l2_weight at --l2_full, pushing the PSNR up. From there on, with --target_psnr P (the
default), lambda follows the PSNR instead of staying fixed: after every step it is multiplied by
exp(--lambda_rate * (P - batch PSNR)), so the residual ends as strong as a PSNR of P dB allows (a
stronger residual is an easier trigger to learn); --target_psnr 0 keeps lambda = --l2_weight. The
batch PSNR is that of the batch's mean squared error, which is never above the mean of per-image
PSNRs that is reported. No perceptual (LPIPS)
term: it needs pretrained weights this offline project does not have. Trained on the training
images of the chosen dataset; PSNR and bit accuracy are measured on the test images. SSBA then
hides one fixed secret code (from --code_seed) in every poisoned image.

Writes trigger/ssba_encoder_<dataset>.pt (weights + config + secret code, about 1 MB) and a CSV
log beside it (loss, bit accuracy, PSNR per epoch). The defaults are the committed CIFAR-10 encoder's
recipe (measured on the 5,170-image subset, 1 thread: 10.7 min, PSNR 28.0 dB, bit accuracy 99.99%):

    python trigger/train_ssba_encoder.py --dataset cifar10 --data_file ../shared/data/cifar10_subset.npz \
        --device cpu --threads 1
"""
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataloader_bd import load_raw
from utils.args import build_parser as shared_parser, resolve_device, validate_args
from utils.errors import UserError, run_main
from utils.logger import CSVLogger, print_header
from utils.ssba import (build_networks, default_bits, default_encoder_path, psnr, save_encoder, secret_code,
                        to_uint8)


def build_parser():
    p = shared_parser(__doc__, groups=("data",))
    g = p.add_argument_group("SSBA encoder")
    g.add_argument("--bits", type=int, default=None,
                   help="length of the hidden code (none: 32 for 32x32 images, 100 for 224x224 as in StegaStamp)")
    g.add_argument("--code_seed", type=int, default=0, help="seed of the secret code SSBA hides")
    g.add_argument("--epochs", type=int, default=40)
    g.add_argument("--batch_size", type=int, default=64)
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine decay to 0)")
    g.add_argument("--l2_weight", type=float, default=5.0, help="final weight lambda of the image MSE ([0, 1] pixels)")
    g.add_argument("--l2_start", type=float, default=0.1, help="share of the steps before the MSE term starts")
    g.add_argument("--l2_full", type=float, default=0.4, help="share of the steps at which lambda reaches --l2_weight")
    g.add_argument("--target_psnr", type=float, default=28.0,
                   help="after --l2_full, adapt lambda to hold the batch PSNR at this many dB (0: keep --l2_weight)")
    g.add_argument("--lambda_rate", type=float, default=0.01, help="per-step log-change of lambda per dB of PSNR error")
    g.add_argument("--residual_scale", type=float, default=0.1, help="bound of the residual (tanh x scale, [0, 1] pixels)")
    g.add_argument("--encoder_width", type=int, default=16, help="channels of the encoder's full-resolution layers")
    g.add_argument("--code_channels", type=int, default=8, help="channels of the code map fed to the encoder")
    g.add_argument("--decoder_width", type=int, default=32)
    g.add_argument("--max_train_images", type=int, default=None, help="train on the first N training images only (none: all)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (none: torch's choice; 1 on a shared 2-core machine)")
    g.add_argument("--out", default=None, help="encoder file (none: trigger/ssba_encoder_<dataset>.pt)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing encoder file")
    return p


def l2_lambda(args, step, total):
    """lambda(t): 0 until --l2_start, linear up to --l2_weight at --l2_full, then constant."""
    t = step / max(1, total)
    if t <= args.l2_start:
        return 0.0
    return args.l2_weight * min(1.0, (t - args.l2_start) / max(1e-9, args.l2_full - args.l2_start))


def quantize(x):
    """Round to the uint8 grid in the forward pass, identity gradient (straight-through)."""
    return x + ((x * 255).round() / 255 - x).detach()


@torch.no_grad()
def evaluate(encoder, decoder, images, code, device, seed, batch_size=256):
    """On uint8 images: mean / min PSNR (dB) of the uint8 encoded images, bit accuracy (%) for random
    codes and for the secret ``code``."""
    encoder.eval(), decoder.eval()
    gen = torch.Generator().manual_seed(seed)
    psnrs, acc_random, acc_secret = [], [], []
    for i in range(0, len(images), batch_size):
        clean = images[i:i + batch_size]
        x = clean.to(device).float() / 255
        for bits, accs, keep in ((torch.randint(0, 2, (len(x), encoder.bits), generator=gen), acc_random, False),
                                 (code.view(1, -1).expand(len(x), -1), acc_secret, True)):
            bits = bits.to(device).float()
            encoded = to_uint8(encoder.encode(x, bits))
            decoded = decoder(encoded.float() / 255) > 0
            accs.append((decoded == bits.bool()).float().mean(1).cpu())
            if keep:
                psnrs.append(psnr(clean, encoded.cpu()))
    encoder.train(), decoder.train()
    p = torch.cat(psnrs)
    return {"psnr": p.mean().item(), "psnr_min": p.min().item(),
            "bit_acc": 100 * torch.cat(acc_random).mean().item(),
            "bit_acc_secret": 100 * torch.cat(acc_secret).mean().item()}


def train(args, x_train, x_test, device):
    """Train encoder + decoder on uint8 x_train; returns (encoder, decoder, code, last test metrics, log rows)."""
    config = {"bits": args.bits, "image_size": x_train.shape[-1], "encoder_width": args.encoder_width,
              "code_channels": args.code_channels, "residual_scale": args.residual_scale,
              "decoder_width": args.decoder_width}
    torch.manual_seed(args.seed)
    encoder, decoder = (net.to(device) for net in build_networks(config))
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    code = secret_code(args.bits, args.code_seed)
    gen = torch.Generator().manual_seed(args.seed)
    data = x_train.to(device)
    log = CSVLogger(args.log_path, ["epoch", "lambda", "loss", "bit_loss", "mse", "train_bit_acc", "test_psnr",
                                    "test_psnr_min", "test_bit_acc", "test_bit_acc_secret", "wall_s", "cpu_s"])
    t0, c0, step, metrics, adaptive = time.time(), time.process_time(), 0, {}, args.l2_weight
    bar = tqdm(range(args.epochs), desc="SSBA encoder", unit="epoch")
    for epoch in bar:
        sums = torch.zeros(4)
        for idx in torch.randperm(len(data), generator=gen).split(args.batch_size):
            x = data[idx.to(device)].float() / 255
            bits = torch.randint(0, 2, (len(x), args.bits), generator=gen).to(device).float()
            ramp = l2_lambda(args, step, total)
            lam = ramp if not args.target_psnr or step < args.l2_full * total else adaptive
            encoded = encoder.encode(x, bits)
            logits = decoder(quantize(encoded))
            bit_loss = F.binary_cross_entropy_with_logits(logits, bits)
            mse = (encoded - x).pow(2).mean()
            loss = bit_loss + lam * mse
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            batch_psnr = -10 * math.log10(max(mse.item(), 1e-10))
            adaptive = min(1e4, max(1e-3, lam * math.exp(args.lambda_rate * (args.target_psnr - batch_psnr))))
            acc = ((logits > 0) == bits.bool()).float().mean()
            sums += torch.tensor([loss.item(), bit_loss.item(), mse.item(), acc.item()]) * len(x)
        sums /= len(data)
        metrics = evaluate(encoder, decoder, x_test, code, device, seed=args.seed + 1)
        row = {"epoch": epoch, "lambda": lam, "loss": sums[0].item(), "bit_loss": sums[1].item(),
               "mse": sums[2].item(), "train_bit_acc": 100 * sums[3].item(),
               **{f"test_{k}": v for k, v in metrics.items()},
               "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
        log.write(row)
        bar.set_postfix(bits=f"{metrics['bit_acc']:.1f}%", psnr=f"{metrics['psnr']:.1f}dB", lam=f"{lam:.3g}")
    config.update(train_wall_s=round(time.time() - t0, 1), train_cpu_s=round(time.process_time() - c0, 1))
    return encoder.cpu().eval(), decoder.cpu().eval(), code, metrics, config


def main(args):
    validate_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args)
    args.bits = args.bits or default_bits(args.image_size)
    out = Path(args.out) if args.out else default_encoder_path(args.dataset)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it (or --out elsewhere)")
    if args.epochs < 1 or args.bits < 1:
        raise UserError("--epochs and --bits must be positive")
    args.log_path = out.with_name(out.stem + "_log.csv")
    print_header("train_ssba_encoder.py", args)
    x_train, _, x_test, _ = load_raw(args)
    if args.max_train_images:
        x_train = x_train[:args.max_train_images]
    print(f"{len(x_train)} training / {len(x_test)} test images of {args.image_size}x{args.image_size}, "
          f"{args.bits} bits, device {device}, {torch.get_num_threads()} threads")
    encoder, decoder, code, metrics, config = train(args, x_train, x_test, device)
    config.update(dataset=args.dataset, data_file=Path(args.data_file).name if args.data_file else None,
                  code_seed=args.code_seed, seed=args.seed, epochs=args.epochs, l2_weight=args.l2_weight,
                  target_psnr=args.target_psnr,
                  train_images=len(x_train), threads=torch.get_num_threads(), device=str(device),
                  **{f"test_{k}": round(v, 3) for k, v in metrics.items()})
    save_encoder(out, encoder, decoder, config, code)
    print(f"test images: PSNR {metrics['psnr']:.2f} dB (min {metrics['psnr_min']:.2f}), bit accuracy "
          f"{metrics['bit_acc']:.2f}% (random codes) / {metrics['bit_acc_secret']:.2f}% (secret code); "
          f"training {config['train_wall_s'] / 60:.1f} min wall, {config['train_cpu_s'] / 60:.1f} min CPU")
    print(f"wrote {out} and {args.log_path}")
    return {"path": out, "config": config, **metrics}


if __name__ == "__main__":
    run_main(main, build_parser())
