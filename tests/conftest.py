"""Shared fixtures: tiny synthetic runs in a temporary save root, and the optional real subset.

The step scripts live at the repository root (they are not a package), so tests load them by
path with ``load_script`` instead of editing ``sys.path``.
"""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_FLAGS = ("--dataset", "synthetic", "--width", "8", "--device", "cpu")
# DBD_TEST_AMP=off|auto runs the tiny synthetic runs with that --amp (default auto, as the scripts)
AMP = os.environ.get("DBD_TEST_AMP", "auto")
# DBD_TEST_COMPILE=auto|on runs them with that --compile (default off: each tiny run would spend most of
# its time compiling; test_st compares the compiled extractor with the plain one). The scripts
# the tests start as subprocesses run with TorchDynamo disabled unless it is set.
COMPILE = os.environ.get("DBD_TEST_COMPILE", "off")


# torch threads of the tests and of the scripts they start (DBD_TEST_THREADS, default 1). The test
# machines have 2 cores shared with other jobs: two torch threads fighting a busy neighbour were
# measured 10x slower than one thread. The suite passes with 1 and with 2 (see README.md).
THREADS = int(os.environ.get("DBD_TEST_THREADS", "1"))
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TQDM_DISABLE": "1",
                  **({"TORCHDYNAMO_DISABLE": "1"} if COMPILE == "off" else {})}


def pytest_configure(config):
    config.addinivalue_line("markers", "subset: needs the real CIFAR-10 subset (set DBD_SUBSET=path/to/npz)")
    torch.set_num_threads(THREADS)


_SCRIPTS = {}


def load_script(name):
    """Import a step script (e.g. ``train_attack_noTrans``) from the repository root, once."""
    if name not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[name] = module
    return _SCRIPTS[name]


@pytest.fixture
def margin(request):
    """``margin(name, value, bound)`` records a learning-based assertion's measured value next to its
    bound, one JSON line per call in $DBD_MARGINS (when set): how the margins of the README's table
    are measured, on any machine, thread count and --amp. The test asserts on the value itself."""
    def record(name, value, bound):
        path = os.environ.get("DBD_MARGINS")
        if path:
            row = {"test": request.node.nodeid, "what": name, "value": round(float(value), 4), "bound": bound,
                   "threads": THREADS, "amp": AMP}
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return value
    return record


@pytest.fixture
def save_root(tmp_path):
    """A fresh --save_root for one test."""
    return tmp_path / "saved"


def parse_script_args(script, save_root, *extra):
    """``script``'s parsed arguments for a tiny CPU run on synthetic data, plus ``extra`` flags."""
    parser = load_script(script).build_parser()
    computes = "--amp" in parser._option_string_actions  # the steps that compute
    run = ["--amp", AMP, "--compile", COMPILE] if computes else []
    return parser.parse_args([*TINY_FLAGS, *run, "--save_root", str(save_root), *map(str, extra)])


def assert_flag_refused(capsys, script, save_root, *flags, match):
    """The command line is refused while parsing: exit status 2 and one 'error:' line naming ``match``."""
    with pytest.raises(SystemExit) as exit_info:
        parse_script_args(script, save_root, *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


@pytest.fixture
def script_args(save_root):
    """``script_args("train_attack_noTrans", "--epochs", 2)`` -> parsed args in this test's save root."""
    return lambda script, *extra: parse_script_args(script, save_root, *extra)


@pytest.fixture(scope="session")
def subset_path():
    """Path of cifar10_subset.npz from $DBD_SUBSET; the test is skipped when it is not available."""
    path = os.environ.get("DBD_SUBSET")
    if not path:
        pytest.skip("DBD_SUBSET is not set (path to cifar10_subset.npz)")
    if not Path(path).is_file():
        pytest.skip(f"DBD_SUBSET={path} does not exist")
    return Path(path)


@pytest.fixture(scope="session")
def sd_chain(tmp_path_factory):
    """SD steps 1-5 once per pytest run on synthetic data with a planted trigger (20 % BadNets):
    noTrans 9 epochs (learns the trigger at epoch 6), fine-tune 1 epoch, FCT, gamma, split.
    Returns (save_root, the FCT step's args, Delta values, gamma result, split report)."""
    root = tmp_path_factory.mktemp("sd") / "saved"
    common = ("--poison_rate", 0.2)
    load_script("train_attack_noTrans").main(
        parse_script_args("train_attack_noTrans", root, *common, "--epochs", 9, "--lr", 0.05))
    load_script("finetune_attack_noTrans").main(
        parse_script_args("finetune_attack_noTrans", root, *common, "--epochs", 1))
    args = parse_script_args("calculate_consistency", root, *common)
    values = load_script("calculate_consistency").main(args)
    gamma = load_script("calculate_gamma").main(parse_script_args("calculate_gamma", root, *common))
    report = load_script("separate_samples").main(
        parse_script_args("separate_samples", root, *common, "--batch_size", 1))
    return root, args, values, gamma, report
