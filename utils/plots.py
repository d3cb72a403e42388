"""Figures shared by visualize_consistency.py and the results report."""
import numpy as np

ATTACK_NAMES = {"gridTrigger": "BadNets", "squareTrigger": "BadNets (square)", "trojanTrigger": "Trojan",
                "signalTrigger": "Blend-Strip", "kittyTrigger": "Blend-Kitty", "sigTrigger": "SIG",
                "fourCornerTrigger": "CL", "SSBA": "SSBA"}


def plot_fct(ax, clean, poison, title, gammas=None):
    """Draw the two histograms on ``ax`` (shared by the results report's figure grid)."""
    allv = np.concatenate([clean, poison])
    positive = allv[allv > 0]
    log = len(positive) > 0 and positive.max() / max(np.percentile(positive, 1), 1e-12) > 100
    if log:
        lo = max(np.percentile(positive, 0.5), 1e-6)
        bins = np.logspace(np.log10(lo), np.log10(positive.max()), 60)
        clean, poison = np.clip(clean, lo, None), np.clip(poison, lo, None)
        ax.set_xscale("log")
    else:
        bins = np.linspace(allv.min(), allv.max(), 60)
    ax.hist(clean, bins=bins, alpha=0.6, color="tab:blue", label=f"clean ({len(clean)})")
    ax.hist(poison, bins=bins, alpha=0.6, color="tab:red", label=f"poisoned ({len(poison)})")
    for value, name, style in zip(gammas or (), ("$\\gamma_c$", "$\\gamma_p$"), ("--", ":")):
        if value is not None and np.isfinite(value):
            ax.axvline(max(value, bins[0]), color="k", linestyle=style, label=f"{name} = {value:.3g}")
    ax.set_xlabel("FCT  $\\Delta_{trans}(x;\\tau,f)$" + (" (log scale)" if log else ""))
    ax.set_ylabel("number of samples")
    ax.set_title(title)
    ax.legend(fontsize=8)
