"""D-ST's maths (SPEC section 4): the semi-supervised contrastive loss, the mixed cross-entropy, the
encoder + projection head, the frozen-encoder classifier and the two SupCon views. The ST steps
train with the project's one loop (utils.train.sgd_epoch) and its warm-up + cosine lr; what the
three ST scripts share besides (flags, folders, data, checkpoints) is in utils/st.py.

Symbols follow the paper: D_c (clean_set, trusted labels), D_p (poison_set), D_u (suspicious_set).
"""
import hashlib
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import build_model
from utils.augment import supcon_view

PROJECTION_DIM = 128
BASE_TEMPERATURE = 0.07  # SupContrast scales its loss by T / 0.07; kept so that lr 0.5 means the same step


# ----------------------------------------------------------------------------------- losses
def positive_mask(labels, trusted, n_views=2):
    """Which pairs of the V*B views are positives (bool (V*B, V*B), view-major, diagonal False).

    Two views are positives if they come from the same image, or if both images are in D_c
    (trusted) and share a label. A D_p / D_u image (trusted False) therefore has exactly one
    positive per other view (its own), and a D_c anchor never counts a D_p / D_u view as positive:
    the paper's rule. (The original code masked only the anchor rows.)
    """
    b = len(labels)
    sample = torch.arange(b, device=labels.device).repeat(n_views)
    y, t = labels.repeat(n_views), trusted.repeat(n_views)
    pos = (sample[:, None] == sample[None, :]) | ((y[:, None] == y[None, :]) & t[:, None] & t[None, :])
    return pos.fill_diagonal_(False)


def semi_supcon_loss(features, labels, trusted, temperature=0.1, base_temperature=BASE_TEMPERATURE):
    """Semi-supervised contrastive loss of D-ST (SPEC 4.1).

    features: (B, V, D) L2-normalised projections, V views of each of the B images;
    labels: (B,) training labels (only those of trusted images are used); trusted: (B,) bool, the
    image is in D_c. For every anchor view i (all V*B views are anchors):
        l_i = -(T / T_base) * mean_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T) )
    with P(i) from ``positive_mask``. Every trusted -> SupCon; none trusted -> SimCLR (NT-Xent).
    Returns the mean of l_i over the V*B anchors (a scalar, float32).
    """
    b, v, _ = features.shape
    z = features.float().transpose(0, 1).reshape(v * b, -1)
    logits = z @ z.T / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()  # numerical stability only
    self_pair = torch.eye(v * b, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pair, float("-inf"))          # an anchor is not its own contrast
    log_prob = logits - torch.logsumexp(logits, 1, keepdim=True)
    pos = positive_mask(labels, trusted, v)
    mean_log_prob_pos = log_prob.masked_fill(~pos, 0.0).sum(1) / pos.sum(1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def mixed_cross_entropy(logits, labels, is_poison, lam=0.001, class_weight=None):
    """SPEC 4.2: CE(D_c) - lam * CE(D_p), each CE the mean over the batch samples of its set.

    logits (B, C), labels (B,), is_poison (B,) bool (the sample is in D_p). A set absent from
    the batch contributes 0 (never NaN). With no D_p at all this is the plain cross-entropy.
    class_weight (C,), optional: CE(D_c) becomes the class-weighted mean (F.cross_entropy's weight).
    """
    zero = logits.sum() * 0.0  # keeps the graph and the dtype
    clean = ~is_poison
    ce_clean = F.cross_entropy(logits[clean], labels[clean], weight=class_weight) if clean.any() else zero
    ce_poison = F.cross_entropy(logits[is_poison], labels[is_poison]) if is_poison.any() else zero
    return ce_clean - lam * ce_poison


def balanced_class_weights(labels, num_classes):
    """w_k = n / (K_present * n_k) for the classes present in ``labels`` (0 for absent ones), so that
    every class weighs the same in CE(D_c) whatever its share of D_c."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * (counts > 0).sum()), torch.zeros_like(counts))
    return w


# ----------------------------------------------------------------------------------- networks
class SupConNet(nn.Module):
    """Encoder (CIFAR ResNet without max-pool) + projection head Linear(d,d)-ReLU-Linear(d,128).

    forward: images (B, 3, H, W) in [0, 1] -> L2-normalised projections (B, 128), float32;
    features: -> the pooled encoder features (B, d), what the classifier sees.
    """

    def __init__(self, encoder, projection_dim=PROJECTION_DIM):
        super().__init__()
        self.encoder = encoder
        d = encoder.feature_dim
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, projection_dim))

    def features(self, x):
        return self.encoder.features(x)

    def forward(self, x):
        return F.normalize(self.head(self.features(x)).float(), dim=1)


class FrozenEncoderClassifier(nn.Module):
    """The D-ST model: a frozen encoder (eval mode, no gradients) and a trainable linear layer.

    forward: images -> logits (B, C) (the interface utils.train.evaluate expects).
    normalize=True (an opt-in improvement) feeds L2-normalised features to the linear layer.
    """

    def __init__(self, encoder, num_classes, normalize=False):
        super().__init__()
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.linear = nn.Linear(encoder.feature_dim, num_classes)
        self.normalize = normalize

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()  # BN statistics of the frozen encoder never move
        return self

    def features(self, x):
        f = self.encoder.features(x)
        return F.normalize(f.float(), dim=1) if self.normalize else f

    def forward(self, x):
        return self.linear(self.features(x))


def build_encoder(meta):
    """The D-ST encoder described by a dict of args (a checkpoint's, or describe_args of a run)."""
    return build_model(meta["model"], 0, meta["mean"], meta["std"], meta["width"], maxpool=False,
                       imagenet=meta["dataset"] == "imagenet")


def weights_fingerprint(module):
    """A short hash of a module's state (weights and BN buffers), to tie a classifier to its encoder."""
    h = hashlib.sha256()
    for k, t in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------- views
def two_views(x, g):
    """Two SupCon views of each image, batched: (2B, 3, H, W), view-major, channels-last."""
    return supcon_view(torch.cat([x, x]), g).contiguous(memory_format=torch.channels_last)
