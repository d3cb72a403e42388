"""Figures shared by visualize_consistency.py and the results report."""
from pathlib import Path

import numpy as np

ATTACK_NAMES = {"gridTrigger": "BadNets", "squareTrigger": "BadNets (square)", "trojanTrigger": "Trojan",
                "signalTrigger": "Blend-Strip", "kittyTrigger": "Blend-Kitty", "sigTrigger": "SIG",
                "fourCornerTrigger": "CL", "SSBA": "SSBA"}


def plot_fct(ax, clean, poison, title, gammas=None):
    """Draw the two histograms on ``ax`` (shared by the results report's figure grid).

    A logarithmic Delta axis when the values span several decades; then the samples with Delta
    exactly 0 (most clean ones after a collapsed L_intra fine-tuning) are drawn in the first bin and
    counted in a note on the plot. A logarithmic count axis when one group is over 10x the other
    (a 500-sample clean-label poison set beside 49,500 clean samples), so both stay visible."""
    allv = np.concatenate([clean, poison])
    positive = allv[allv > 0]
    log = len(positive) > 0 and positive.max() / max(np.percentile(positive, 1), 1e-12) > 100
    if log:
        lo = max(np.percentile(positive, 0.5), 1e-6)
        bins = np.logspace(np.log10(lo), np.log10(positive.max()), 60)
        zeros = int((clean <= 0).sum()), int((poison <= 0).sum())
        if sum(zeros):
            ax.text(0.02, 0.97, f"$\\Delta$ = 0 exactly (first bin): {zeros[0]:,} clean, {zeros[1]:,} poisoned",
                    transform=ax.transAxes, fontsize=7, va="top")
        clean, poison = np.clip(clean, lo, None), np.clip(poison, lo, None)
        ax.set_xscale("log")
    else:
        bins = np.linspace(allv.min(), allv.max(), 60)
    counts_log = min(len(clean), len(poison)) > 0 and max(len(clean), len(poison)) > 10 * min(len(clean), len(poison))
    if counts_log:
        ax.set_yscale("log")
    ax.hist(clean, bins=bins, alpha=0.6, color="tab:blue", label=f"clean ({len(clean)})")
    ax.hist(poison, bins=bins, alpha=0.6, color="tab:red", label=f"poisoned ({len(poison)})")
    for value, name, style in zip(gammas or (), ("$\\gamma_c$", "$\\gamma_p$"), ("--", ":")):
        if value is not None and np.isfinite(value):
            ax.axvline(max(value, bins[0]), color="k", linestyle=style, label=f"{name} = {value:.3g}")
    ax.set_xlabel("FCT  $\\Delta_{trans}(x;\\tau,f)$" + (" (log scale)" if log else ""))
    ax.set_ylabel("number of samples" + (" (log scale)" if counts_log else ""))
    ax.set_title(title)
    ax.legend(fontsize=8)


def save_trigger_estimate(path, trigger, examples, stamped):
    """D-BR's --relearn_stamp picture: the estimated trigger (D_p mean, mask) and a few D_c images
    before / after stamping. Tensors in [0, 1], (3, H, W) or (n, 3, H, W)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shift, mask, poison_mean = (t.detach().float().cpu() for t in trigger)
    n = len(examples)
    fig, axes = plt.subplots(2, n + 1, figsize=(1.8 * (n + 1), 3.8))
    rgb = lambda t: t.permute(1, 2, 0).clamp(0, 1).numpy()  # noqa: E731
    axes[0, 0].imshow(rgb(poison_mean)); axes[0, 0].set_title("mean of $\\hat D_p$", fontsize=8)
    axes[1, 0].imshow(mask.mean(0).numpy(), cmap="gray", vmin=0, vmax=1)
    axes[1, 0].set_title("mask (1 = overwritten)", fontsize=8)
    for i in range(n):
        axes[0, i + 1].imshow(rgb(examples[i].float().cpu())); axes[0, i + 1].set_title("$\\hat D_c$ image", fontsize=8)
        axes[1, i + 1].imshow(rgb(stamped[i].float().cpu())); axes[1, i + 1].set_title("stamped", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"trigger estimated from the split (mean |shift| {shift.abs().mean():.3f})", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # beside --checkpoint_save, which may be a new folder
    fig.savefig(path, dpi=120)
    plt.close(fig)
