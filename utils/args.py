"""One argument builder for every script.

Each script calls ``build_parser(description, groups, **defaults)`` and adds only what is its own.
Dataset facts (classes, image size, normalisation) live in ``DATASETS`` and are derived from
``--dataset``; nothing else in the project types them again.
"""
import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.errors import UserError


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple


DATASETS = {
    "cifar10": DatasetInfo(10, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": DatasetInfo(100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": DatasetInfo(200, 224, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    # generated in code (dataloader_bd.make_synthetic): for the demo and the unit tests
    "synthetic": DatasetInfo(10, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}
MODELS = ("resnet18", "resnet34", "resnet50")
TARGET_TYPES = ("all2one", "all2all", "cleanLabel")
TRIGGER_TYPES = ("gridTrigger", "squareTrigger", "trojanTrigger", "signalTrigger", "kittyTrigger",
                 "sigTrigger", "fourCornerTrigger", "SSBA", "squareTrigger_imagenet",
                 "signalTrigger_imagenet")
FCT_TRANSFORMS = ("rotate", "affine", "flip", "crop", "blur", "erase", "none")
DEFAULT_SEED = 1000
# the CIFAR-10 table's attacks: run_all.sh name -> (target_type, trigger_type, name in the paper's table)
PAPER_ATTACKS = {
    "badnets": ("all2one", "gridTrigger", "BadNets-all2one"),
    "badnets_all2all": ("all2all", "squareTrigger", "BadNets-all2all"),
    "trojan": ("all2one", "trojanTrigger", "Trojan"),
    "blend": ("all2one", "signalTrigger", "Blend-Strip"),
    "kitty": ("all2one", "kittyTrigger", "Blend-Kitty"),
    "sig": ("cleanLabel", "sigTrigger", "SIG"),
    "cl": ("cleanLabel", "fourCornerTrigger", "CL"),
}


# ----------------------------------------------------------------------------------- value types
# argparse types: a bad value is refused while parsing, with argparse's one-line message
def _number(kind, test, wanted):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or not test(value):  # value != value: NaN
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
nonneg_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
open_unit = _number(float, lambda v: 0 < v < 1, "in (0, 1)")
rate = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")
unit_interval = _number(float, lambda v: 0 <= v <= 1, "in [0, 1]")
holdout_share = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")


def _add_data(p):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS))
    g.add_argument("--data_root", default="./dataset/",
                   help="where CIFAR is downloaded / the ImageNet subset lives / an image-folder --data_file is cached")
    g.add_argument("--data_file", default=None,
                   help="an .npz with uint8 HWC arrays x_train y_train x_test y_test, or an image folder (a folder, "
                        ".tar or .tar.gz with train/<class>/* and test/<class>/*, labels from the sorted class "
                        "names), decoded once into <data_root>/<name>-<fingerprint>.npz; overrides the download")
    g.add_argument("--num_workers", type=nonneg_int, default=2, help="loader workers (ImageNet folder reading only)")
    g.add_argument("--seed", type=nonneg_int, default=DEFAULT_SEED, help="fixes the poisoned indices and all randomness")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def _add_attack(p):
    g = p.add_argument_group("attack")
    g.add_argument("--poison_rate", type=rate, default=0.10)
    g.add_argument("--target_type", default="all2one", choices=TARGET_TYPES)
    g.add_argument("--target_label", type=nonneg_int, default=0)
    g.add_argument("--trigger_type", default="gridTrigger",
                   help="one of: " + ", ".join(TRIGGER_TYPES))
    g.add_argument("--blend_image", default=None,
                   help="kittyTrigger: blend this image instead of trigger/hello_kitty.png")
    g.add_argument("--clean_model", default=None,
                   help="fourCornerTrigger (CL): clean model for the PGD step "
                        "(default: last checkpoint of train_clean_withTrans.py)")
    g.add_argument("--ssba_encoder", default=None,
                   help="SSBA: encoder file of trigger/train_ssba_encoder.py (default: trigger/ssba_encoder_<dataset>.pt)")


def _add_model(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet18", choices=MODELS)
    g.add_argument("--width", type=positive_int, default=64,
                   help="base channels of the ResNet (64 = paper; 16 makes CPU runs practical)")


def _add_optim(p):
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=200)
    g.add_argument("--batch_size", type=positive_int, default=128)
    g.add_argument("--lr", type=positive_float, default=0.01)
    g.add_argument("--momentum", type=unit_interval, default=0.9)
    g.add_argument("--weight_decay", type=nonneg_float, default=5e-4)
    g.add_argument("--schedule", type=nonneg_int, nargs="*", default=[100, 150],
                   help="epochs at which the lr is multiplied by --gamma (step schedule)")
    g.add_argument("--gamma", type=positive_float, default=0.1, help="lr decay factor of the step schedule")
    g.add_argument("--cosine_period", type=positive_int, default=100,
                   help="period (epochs) of the cosine schedule of the noTrans/fine-tuning steps")
    g.add_argument("--save_freq", type=positive_int, default=1,
                   help="keep every N-th epoch checkpoint (the last epoch is always kept)")
    g.add_argument("--amp", default="auto", choices=("auto", "on", "off"),
                   help="bf16 mixed precision (auto: on for CUDA; on a CPU with native bf16 (AMX / "
                        "AVX512-BF16) for inference, i.e. evaluation and FCT, and for the D-ST extractor's "
                        "training, both measured 2x faster there)")
    g.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile of the network's forward and backward (TorchInductor; each batch shape "
                        "compiles once, about a minute on a 2-core CPU). auto: on for the D-ST extractor on a CPU "
                        "with a C++ compiler, where it was measured faster (BENCHMARKS.md); off elsewhere")


def _add_io(p):
    g = p.add_argument_group("input / output")
    g.add_argument("--checkpoint_load", "-checkpoint_load", default=None)
    g.add_argument("--checkpoint_save", default=None)
    g.add_argument("--log", default=None, help="CSV log path (default: log.csv in the run folder)")
    g.add_argument("--save_root", default="./saved", help="every output goes under this folder")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this run")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run (without it, an output made with other settings is "
                        "never replaced)")


# --sd_model: the model whose Delta SD steps 3-5 use -> the run folder it is taken from (utils/paths.py)
SD_MODELS = {"finetuned": "noTrans_ftsimi", "noTrans": "noTrans"}


def _add_sd(p):
    g = p.add_argument_group("sample distinguishment")
    g.add_argument("--clean_ratio", "---clean_ratio", type=open_unit, default=0.20, help="alpha_c")
    g.add_argument("--poison_ratio", type=open_unit, default=0.05, help="alpha_p (alpha_c + alpha_p <= 1)")
    g.add_argument("--gamma_low", type=float, default=None, help="gamma_c (default: from calculate_gamma.py)")
    g.add_argument("--gamma_high", type=float, default=None, help="gamma_p (default: from calculate_gamma.py)")
    g.add_argument("--split_rule", default="rank", choices=("rank", "threshold"),
                   help="with gamma from alpha_c / alpha_p: 'rank' (the floor(alpha_c N) smallest and floor(alpha_p N) "
                        "largest Delta, ties broken at random) or 'threshold' (the original code's: Delta <= gamma_c "
                        "-> D_c, Delta >= gamma_p -> D_p, so every tie at gamma_c joins D_c)")
    g.add_argument("--trans1", default="rotate", choices=FCT_TRANSFORMS, help="first transform of tau")
    g.add_argument("--trans2", default="affine", choices=FCT_TRANSFORMS, help="second transform of tau")
    g.add_argument("--fct_draws", type=positive_int, default=1,
                   help="opt-in, beyond the paper: average Delta over this many random tau per sample")
    g.add_argument("--sd_model", default="finetuned", choices=SD_MODELS,
                   help="the model FCT measures Delta with: 'finetuned' (the paper: the newest L_intra fine-tuned "
                        "model) or 'noTrans' (opt-in, beyond the paper: the newest noTrans model, so SD step 2 is "
                        "not needed)")
    g.add_argument("--sd_width", type=positive_int, default=None,
                   help="width of the SD models whose split is used (default: --width)")


GROUPS = {"data": _add_data, "attack": _add_attack, "model": _add_model, "optim": _add_optim,
          "io": _add_io, "sd": _add_sd}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2, a pointer to --help) and the checks that involve two
    flags, so that every script refuses a bad command line before it writes anything.

    A parser built for a step (``build_parser(..., step=...)``) has ``--recipe NAME``: the recipe's
    settings for that step (utils/recipes.py) become the defaults, and a flag given explicitly wins.
    The parsed arguments carry ``recipe`` (the name) and ``recipe_set`` (what it set)."""
    step = None

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        if self.step is not None:
            args = sys.argv[1:] if args is None else list(args)
            self._apply_recipe(_recipe_named(args))
        parsed, rest = super().parse_known_args(args, namespace)
        problem = cross_check(parsed)
        if problem:
            self.error(problem)
        return parsed, rest

    def _apply_recipe(self, name):
        from utils import recipes
        if name not in recipes.RECIPES:
            self.error(f"argument --recipe: invalid choice: {name!r} (choose from {', '.join(recipes.RECIPES)})")
        own = {a.dest for a in self._actions}
        values = {k: v for k, v in recipes.settings(name, self.step).items() if k in own}
        # back to the defaults without a recipe first: a parser may parse more than once (tests)
        for action in self._actions:
            action.default = self._base_defaults.setdefault(action, action.default)
        self._defaults = dict(self._base_parser_defaults)
        self.set_defaults(**values, recipe=name, recipe_set=recipes.describe(name, values))


def _recipe_named(argv):
    """The value of --recipe in a command line (before parsing it: the recipe sets the defaults)."""
    from utils.recipes import DEFAULT
    name = DEFAULT
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--recipe" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--recipe="):
            name = arg.split("=", 1)[1]
    return name


def cross_check(args):
    """The first problem between flags that argparse's per-flag types cannot see, or None."""
    get = lambda name: getattr(args, name, None)  # noqa: E731
    if get("clean_ratio") is not None and get("poison_ratio") is not None \
            and args.clean_ratio + args.poison_ratio > 1 + 1e-9:
        return (f"--clean_ratio {args.clean_ratio} + --poison_ratio {args.poison_ratio} exceed 1: D_c and D_p "
                "would share samples")
    if (get("gamma_low") is None) != (get("gamma_high") is None):
        return "give both --gamma_low and --gamma_high, or neither"
    if get("gamma_low") is not None and not args.gamma_low < args.gamma_high:
        return f"--gamma_low {args.gamma_low} must be below --gamma_high {args.gamma_high}"
    if get("target_label") is not None and get("dataset") in DATASETS:
        n = DATASETS[args.dataset].num_classes
        if not 0 <= args.target_label < n:
            return f"--target_label {args.target_label} is out of range for {args.dataset} ({n} classes)"
    return None


def build_parser(description, groups=("data", "attack", "model", "optim", "io"), step=None, **defaults):
    """The shared parser: the named flag groups, with script-specific defaults. ``step`` (a name of
    utils.recipes.STEPS) adds --recipe; the default recipe's settings show in --help."""
    parser = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name in groups:
        GROUPS[name](parser)
    parser.set_defaults(**defaults)
    if step is not None:
        from utils import recipes
        parser.add_argument("--recipe", default=recipes.DEFAULT, choices=sorted(recipes.RECIPES),
                            help="named settings of utils/recipes.py that set this script's defaults "
                                 "(an explicit flag wins)")
        parser.step = step
        parser._base_defaults = {}  # action -> its default without a recipe
        parser._base_parser_defaults = dict(parser._defaults)
        parser._apply_recipe(recipes.DEFAULT)
    return parser


def dataset_info(args):
    return DATASETS[args.dataset]


def validate_args(args):
    """Check what argparse cannot; raise UserError naming the first problem."""
    if hasattr(args, "trigger_type") and args.trigger_type not in TRIGGER_TYPES:
        raise UserError(f"unknown trigger '{args.trigger_type}'; choose one of {', '.join(TRIGGER_TYPES)}")
    problem = cross_check(args)  # again for arguments built without the parser (tests, benchmarks)
    if problem:
        raise UserError(problem)
    if hasattr(args, "trigger_type"):
        imagenet_trigger = args.trigger_type.endswith("_imagenet")
        if imagenet_trigger != (args.dataset == "imagenet") and args.trigger_type != "SSBA":
            raise UserError(f"trigger '{args.trigger_type}' is not for {args.dataset}; "
                            + ("use squareTrigger_imagenet or signalTrigger_imagenet"
                               if args.dataset == "imagenet" else "the _imagenet triggers need --dataset imagenet"))
    for flag, folder_of in (("save_root", Path), ("st_root", Path), ("log", lambda p: Path(p).parent),
                            ("checkpoint_save", lambda p: Path(p).parent)):
        if getattr(args, flag, None):
            check_creatable(folder_of(getattr(args, flag)), f"--{flag}")
    if hasattr(args, "trigger_type"):
        from utils.triggers import asset_fingerprint
        args.trigger_asset = asset_fingerprint(args)  # recorded in checkpoints and splits
    info = dataset_info(args)  # the dataset facts, derived here and nowhere else
    args.num_classes, args.image_size = info.num_classes, info.image_size
    args.mean, args.std = list(info.mean), list(info.std)
    return args


def check_creatable(folder, flag):
    """UserError unless ``folder`` exists as a writable folder or can be created (nothing is created)."""
    p = Path(folder).absolute()
    while not p.exists():
        if p.is_symlink():  # a dangling link
            raise UserError(f"{flag} {folder} cannot be created: {p} is a broken link")
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{flag} {folder} cannot be created: {p} is a file")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder} cannot be created: {p} is not writable")


def resolve_device(args):
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    return torch.device(args.device)


def use_amp(args, device, native_cpu=False):
    """bf16 autocast of training steps: --amp on/off, or (auto) on CUDA. Not on CPUs by default: in the
    one comparison measured (12 withTrans epochs on the subset, the end-to-end test), bf16 training had
    not yet learned the BadNets trigger that fp32 training learns.
    native_cpu=True (the D-ST extractor): auto is also on for a CPU that runs bf16 natively. That
    network has no max-pool, so 4x the activations of the classifiers; it trains 2x faster in bf16
    there, to the same D-ST result (BENCHMARKS.md, "Speed")."""
    if args.amp == "auto":
        return device.type == "cuda" or (native_cpu and device.type == "cpu" and cpu_has_native_bf16())
    return args.amp == "on"


def use_inference_amp(args, device):
    """bf16 autocast of forward-only passes (evaluation, FCT): as training, and with --amp auto also on
    a CPU that runs bf16 natively (measured 2x faster there; ranks and argmaxes are what is used)."""
    if args.amp == "auto" and device.type == "cpu":
        return cpu_has_native_bf16()
    return use_amp(args, device)


def use_compile(args, device, extractor=False):
    """torch.compile of the network: --compile on/off, or (auto) for the D-ST extractor on a CPU, the one
    step measured faster compiled (its encoder has no max-pool: the fused batch-norm and ReLU kernels pay
    there). Not under auto: the max-pool classifiers (no gain measured on a CPU) and CUDA (not measured).
    On a CPU, TorchInductor builds C++ kernels: auto needs a C++ compiler, and on refuses to run without."""
    mode = getattr(args, "compile", "off")
    if mode == "auto":
        return extractor and device.type == "cpu" and _cxx_compiler() is not None
    if mode == "on" and device.type == "cpu" and _cxx_compiler() is None:
        raise UserError("--compile on needs a C++ compiler on a CPU (g++, or the one $CXX names); "
                        "install one or pass --compile off")
    return mode == "on"


def _cxx_compiler():
    import shutil
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def cpu_has_native_bf16():
    """True where oneDNN runs bf16 natively (AMX / AVX512-BF16); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):  # private helpers of torch.cpu: absent in some versions
        return False


def describe_args(args):
    """The arguments as a plain dict (saved in checkpoints and printed at start)."""
    return {k: v for k, v in sorted(vars(args).items()) if isinstance(v, (str, int, float, bool, list, type(None)))}
