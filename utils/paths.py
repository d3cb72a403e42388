"""Every output path of the project, computed from the arguments alone (the paper-readme layout).

With the paper's defaults (full width, all2one, target 0, seed 1000, no --data_file) the folders are
exactly those of paper-readme.md; any other setting adds a suffix, so that runs that differ in
dataset or data file, model or width, attack, target or seed never share a folder.
"""
from pathlib import Path

from utils.args import DEFAULT_SEED

REPO_ROOT = Path(__file__).resolve().parent.parent


def dataset_tag(args):
    """``cifar10``, or ``cifar10-<data file's name>`` (without .npz / .tar / .tar.gz)."""
    from utils.image_folder import source_stem
    tag = args.dataset
    if getattr(args, "data_file", None):
        tag += "-" + source_stem(args.data_file)
    return tag


def model_tag(args, width=None):
    width = args.width if width is None else width
    return args.model if width == 64 else f"{args.model}_w{width}"


def attack_tag(args):
    tag = args.trigger_type + _asset_suffix(args)
    if args.target_type != "all2one":
        tag += f"_{args.target_type}"
    if args.target_label != 0:
        tag += f"_t{args.target_label}"
    if args.seed != DEFAULT_SEED:
        tag += f"_s{args.seed}"
    return tag


def _asset_suffix(args):
    """``_img-<stem>`` / ``_enc-<stem>`` when the run uses its own blend image (kittyTrigger) or
    SSBA encoder instead of the committed one, so that two trigger images never share a folder."""
    from utils.triggers import own_asset
    own = own_asset(args)
    return f"_{own[0]}-{own[1].stem}" if own else ""


def _rate(x):
    return f"{x:g}"


def save_root(args):
    root = Path(args.save_root)
    return root if root.is_absolute() else Path.cwd() / root


def backdoor_dir(args, stage, width=None):
    """stage: noTrans, noTrans_ftsimi or withTrans."""
    return (save_root(args) / "backdoored_model" / f"poison_rate_{_rate(args.poison_rate)}" / stage
            / dataset_tag(args) / model_tag(args, width) / attack_tag(args))


def clean_model_dir(args):
    seed = "" if args.seed == DEFAULT_SEED else f"_s{args.seed}"
    return save_root(args) / "benign_model" / dataset_tag(args) / (model_tag(args) + seed)


def split_dir(args):
    """Folder of the separated samples D_c, D_p, D_u (written by separate_samples.py)."""
    width = args.sd_width if getattr(args, "sd_width", None) else args.width
    return (save_root(args) / "separated_samples" / f"poison_rate_{_rate(args.poison_rate)}"
            / dataset_tag(args) / model_tag(args, width)
            / f"{attack_tag(args)}_{_rate(args.clean_ratio)}_{_rate(args.poison_ratio)}")


def fct_outputs(checkpoint_path):
    """The files of SD steps 3-5 beside the fine-tuned checkpoint ``.../<e>.tar``: ``<e>_all.txt``,
    ``<e>_clean.txt``, ``<e>_poison.txt`` (Delta, one value per line), ``<e>_fct.npy`` (Delta by
    training index), ``<e>_fct.json`` (its settings), ``<e>_gamma.json`` and the histogram ``<e>.jpg``."""
    p = str(Path(checkpoint_path).with_suffix(""))
    return {"all": f"{p}_all.txt", "clean": f"{p}_clean.txt", "poison": f"{p}_poison.txt",
            "values": f"{p}_fct.npy", "settings": f"{p}_fct.json", "gamma": f"{p}_gamma.json",
            "plot": f"{p}.jpg"}


def dbr_outputs(args, victim):
    """D-BR's files beside the backdoored model ``<dir>/<e>.tar`` (or at --checkpoint_save / --log):
    the best-by-test model ``<e>_unlearn_purify.tar``, the last epoch's ``..._last.tar``, the held-out
    selection's ``..._selected.tar``, the trigger estimate's picture and the log ``unlearn_purify.csv``."""
    folder = Path(victim).parent
    best = Path(args.checkpoint_save) if args.checkpoint_save else folder / f"{Path(victim).stem}_unlearn_purify.tar"
    best = best.with_suffix(".tar")
    return {"best": best, "last": best.with_name(best.stem + "_last.tar"),
            "selected": best.with_name(best.stem + "_selected.tar"),
            "trigger_picture": best.with_name(best.stem + "_trigger_estimate.png"),
            "log": Path(args.log) if args.log else folder / "unlearn_purify.csv"}


def st_dir(args):
    """D-ST outputs: <st_root>/poison_rate_<p>/SupCon_models/<dataset>/<model>/<attack>_<ac>_<ap>/,
    with st_root <save_root>/ST_save unless --st_root names another (paper-readme's ST/save layout
    below it)."""
    root = Path(args.st_root) if getattr(args, "st_root", None) else save_root(args) / "ST_save"
    return (root / f"poison_rate_{_rate(args.poison_rate)}" / "SupCon_models" / dataset_tag(args)
            / model_tag(args) / f"{attack_tag(args)}_{_rate(args.clean_ratio)}_{_rate(args.poison_ratio)}")


def shown_path(path, args):
    """``path`` as written into reports: relative to --save_root (``saved/...``) when it lies inside,
    so that a report names no folder of the machine that made it."""
    root = save_root(args)
    try:
        return str(Path(root.name) / Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def latest_checkpoint(run_dir):
    """The highest-numbered ``<epoch>.tar`` in a folder, or None."""
    ckpts = [p for p in Path(run_dir).glob("*.tar") if p.stem.isdigit()]
    return max(ckpts, key=lambda p: int(p.stem)) if ckpts else None
