"""The SSBA encoder file: save, load (once per path), the secret code and batched encoding.

File format (``torch.save`` of plain dicts and tensors, read with ``weights_only=True``)::

    {"format": FORMAT, "config": {...}, "encoder": state_dict, "decoder": state_dict,
     "secret_code": uint8 tensor (bits,)}

``config`` holds what rebuilds the networks (bits, image_size, encoder/decoder widths, residual
scale) and what describes the file (dataset, data file, secret-code seed, measured PSNR and bit
accuracy on the test images, training time). ``trigger/train_ssba_encoder.py`` writes it.
"""
from functools import lru_cache
from pathlib import Path

import torch

from models.ssba import SSBADecoder, SSBAEncoder
from utils.errors import UserError

FORMAT = "dbd-ssba-encoder/1"
ASSETS = Path(__file__).resolve().parent.parent / "trigger"
BUILD_KEYS = ("bits", "image_size", "encoder_width", "code_channels", "residual_scale", "decoder_width")


def default_encoder_path(dataset):
    """The committed encoder of a dataset: trigger/ssba_encoder_<dataset>.pt."""
    return ASSETS / f"ssba_encoder_{dataset}.pt"


def default_bits(image_size):
    """StegaStamp hides 100 bits in 224 x 224 images (ImageNet SSBA); 32 x 32 images carry 32."""
    return 100 if image_size >= 128 else 32


def secret_code(bits, seed):
    """The fixed code every poisoned image hides: uint8 (bits,) in {0, 1}, from ``seed``."""
    return torch.randint(0, 2, (bits,), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def build_networks(config):
    encoder = SSBAEncoder(config["bits"], config["image_size"], config["encoder_width"],
                          config["code_channels"], config["residual_scale"])
    decoder = SSBADecoder(config["bits"], config["image_size"], config["decoder_width"])
    return encoder, decoder


def save_encoder(path, encoder, decoder, config, code):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "config": dict(config),
             "encoder": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
             "decoder": {k: v.detach().cpu() for k, v in decoder.state_dict().items()},
             "secret_code": code.detach().cpu().to(torch.uint8)}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def missing_encoder_message(path, dataset=None):
    flags = f" --dataset {dataset}" if dataset else ""
    return (f"no SSBA encoder at {path}; train one with `python trigger/train_ssba_encoder.py{flags} "
            f"[--data_file F.npz]` (or pass --ssba_encoder)")


@lru_cache(maxsize=8)
def _load(path, mtime_ns):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unreadable file is the user's input problem
        raise UserError(f"{path} is not an SSBA encoder file ({err.__class__.__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not an SSBA encoder file of this project (format {FORMAT})")
    config = state["config"]
    encoder, decoder = build_networks(config)
    try:
        encoder.load_state_dict(state["encoder"], strict=True)
        decoder.load_state_dict(state["decoder"], strict=True)
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not match their config ({str(err).splitlines()[0]})") from None
    return encoder.eval(), decoder.eval(), config, state["secret_code"]


def load_encoder(path, dataset=None):
    """(encoder, decoder, config, secret_code) of the file at ``path``, read once per path and version."""
    path = Path(path)
    if not path.is_file():
        raise UserError(missing_encoder_message(path, dataset))
    return _load(str(path.resolve()), path.stat().st_mtime_ns)


def to_uint8(x):
    """Float images in [0, 1] -> uint8 in [0, 255] (round, clip)."""
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def encode_uint8(encoder, images, code, device="cpu", batch_size=256):
    """uint8 (N, 3, H, W) images -> uint8 encoded images hiding ``code`` (bits,), in batches on ``device``."""
    if len(images) == 0:
        return images.clone()
    device = torch.device(device)
    encoder = encoder.to(device)
    bits = code.to(device).float().view(1, -1)
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float() / 255
        out.append(to_uint8(encoder.encode(x, bits.expand(len(x), -1))).cpu())
    return torch.cat(out)


def psnr(clean, encoded):
    """Per-image PSNR in dB of uint8 (or [0, 255] float) images: (N, 3, H, W) x 2 -> (N,)."""
    mse = (clean.double() - encoded.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))
