"""SSBA (sample-specific backdoor attack): a small StegaStamp-style encoder / decoder pair.

The encoder hides a bit string in an image as an additive residual that depends on both the image
and the bits; the decoder reads the bits back from the encoded image. SSBA poisons every image with
the residual of one fixed secret code, so each poisoned image carries its own, invisible trigger.
Both networks work on float images in [0, 1], (N, 3, H, W); ``trigger/train_ssba_encoder.py``
trains them and ``utils.triggers.ssba_trigger`` uses the encoder.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.ReLU(inplace=True))


class SSBAEncoder(nn.Module):
    """(image x in [0, 1] (N, 3, H, W), bits (N, B) in {0, 1}) -> residual r (N, 3, H, W), |r| < scale.

    The bits become a low-resolution map (linear layer, at most 8 x 8, ``code_channels`` channels),
    upsampled to H x W and concatenated with the image; a two-level U-Net turns that into the
    residual, bounded by ``scale * tanh``. The encoded image is clamp(x + r, 0, 1).
    """

    def __init__(self, bits=32, image_size=32, width=16, code_channels=8, scale=0.1):
        super().__init__()
        self.bits, self.image_size, self.scale = bits, image_size, scale
        self.code_channels, self.code_size = code_channels, min(8, image_size // 4)
        self.code_fc = nn.Linear(bits, code_channels * self.code_size ** 2)
        w = width
        self.enc1 = _conv(3 + code_channels, w)            # H
        self.enc2 = _conv(w, 2 * w, stride=2)              # H/2
        self.enc3 = nn.Sequential(_conv(2 * w, 4 * w, stride=2), _conv(4 * w, 4 * w))  # H/4
        self.dec2 = _conv(4 * w + 2 * w, 2 * w)            # H/2, with the enc2 skip
        self.dec1 = _conv(2 * w + w, w)                    # H, with the enc1 skip
        self.out = nn.Conv2d(w + 3, 3, 1)                  # sees the image once more

    def forward(self, x, bits):
        n, _, h, w = x.shape
        code = self.code_fc(bits.float() * 2 - 1).view(n, self.code_channels, self.code_size, self.code_size)
        code = F.interpolate(code, size=(h, w), mode="nearest")
        xc = x - 0.5
        e1 = self.enc1(torch.cat([xc, code], 1))
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[-2:], mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="nearest"), e1], 1))
        return self.scale * torch.tanh(self.out(torch.cat([d1, xc], 1)))

    def encode(self, x, bits):
        """The encoded image clamp(x + residual, 0, 1)."""
        return (x + self(x, bits)).clamp(0, 1)


class SSBADecoder(nn.Module):
    """Encoded image in [0, 1] (N, 3, H, W) -> bit logits (N, B): three stride-2 convs, pool, two linear layers."""

    def __init__(self, bits=32, image_size=32, width=32):
        super().__init__()
        self.bits, self.image_size = bits, image_size
        self.convs = nn.Sequential(_conv(3, width, 2), _conv(width, 2 * width, 2), _conv(2 * width, 2 * width, 2),
                                   _conv(2 * width, width))
        side = min(4, -(-image_size // 8))  # 4 x 4 for 32 x 32 images; pooled to 4 x 4 for larger ones
        self.pool = nn.AdaptiveAvgPool2d(side)
        self.fc = nn.Sequential(nn.Linear(width * side * side, 4 * bits), nn.ReLU(inplace=True),
                                nn.Linear(4 * bits, bits))

    def forward(self, x):
        return self.fc(self.pool(self.convs(x - 0.5)).flatten(1))
