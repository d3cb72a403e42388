"""The CPU-scale reproduction in one process, with a time guard: every attack's withTrans model,
SD chain, D-BR (faithful and study settings) and D-ST, timed step by step.

run_all.sh is the user-facing, step-per-process way to do the same; this driver calls each step
script's ``main()`` in one Python process (no start-up cost per step), which is how the figures in
BENCHMARKS.md were produced on one NVIDIA H200. Results: ``--out``/summary.jsonl (one line per step)
and the saved/ tree of logs and reports.

  python -m benchmarks.suite --data_file ../shared/data/cifar10_subset.npz --plan main:all study:badnets
"""
import argparse
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the step scripts live at the repository root

from utils import recipes
from utils.args import PAPER_ATTACKS


class Suite:
    def __init__(self, opt):
        self.opt = opt
        self.t_start = time.time()
        self.out = Path(opt.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.summary = self.out / "summary.jsonl"

    def left(self):
        return self.opt.budget - (time.time() - self.t_start)

    def run(self, attack, step, module, argv):
        """Run one step script's main() and record its time and returned figures."""
        mod = importlib.import_module(module)
        args = mod.build_parser().parse_args(argv)
        t0 = time.time()
        result = mod.main(args)
        seconds = time.time() - t0
        record = {"attack": attack, "step": step, "seconds": round(seconds, 2), "argv": " ".join(argv)}
        if isinstance(result, dict):
            record["result"] = json.loads(json.dumps(result, default=lambda o: None))
        with open(self.summary, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[suite] {attack} {step}: {seconds:.1f} s ({self.left():.0f} s left)", flush=True)
        return result

    def common(self, attack, width=16):
        target_type, trigger, _ = PAPER_ATTACKS[attack]
        argv = ["--width", str(width), "--save_root", self.opt.save_root, "--target_type", target_type,
                "--trigger_type", trigger, "--device", self.opt.device]
        return argv + (["--data_file", self.opt.data_file] if self.opt.data_file else ["--dataset", "synthetic"])

    def e(self, n):
        return str(recipes.scaled_epochs(n, self.opt.epoch_scale))

    def epochs(self, name, step):
        """--epochs when --epoch_scale changes recipe NAME's count for STEP (as run_all.sh), else nothing."""
        epochs = recipes.settings(name, step).get("epochs")
        return ["--epochs", self.e(epochs)] if epochs is not None and self.opt.epoch_scale != 1 else []

    # ------------------------------------------------------------------ phases
    def main_phase(self, attack):
        """The quick recipe's victim and SD models, then the paper's FCT split and D-BR at width 16."""
        c = self.common(attack) + ["--recipe", "quick"]
        if attack == "cl":
            self.run(attack, "clean_model", "train_clean_withTrans", c + self.epochs("quick", "clean_model") + ["--overwrite"])
        self.run(attack, "withTrans_w16", "train_attack_withTrans", c + self.epochs("quick", "withTrans") + ["--overwrite"])
        self.run(attack, "sd1_noTrans", "train_attack_noTrans", c + self.epochs("quick", "noTrans") + ["--overwrite"])
        self.run(attack, "sd2_finetune", "finetune_attack_noTrans", c + self.epochs("quick", "finetune") + ["--overwrite"])
        c = self.common(attack) + ["--recipe", "paper", "--width", "16"]
        self.run(attack, "sd3_fct", "calculate_consistency", c)
        self.run(attack, "sd4_gamma", "calculate_gamma", c)
        self.run(attack, "sd3_plot", "visualize_consistency", c)
        self.run(attack, "sd5_split", "separate_samples", c)
        self.run(attack, "dbr_faithful_e20", "unlearn_relearn", c + self.epochs("paper", "dbr") + ["--overwrite"])

    def study_phase(self, attack):
        c = self.common(attack)
        for lr in ("1e-4", "3e-4", "1e-3", "3e-3"):
            for epochs in (20, 200):
                if lr == "1e-4" and epochs == 20:
                    continue  # the faithful run of the main phase
                tag = f"dbr_lr{lr}_e{epochs}"
                self.run(attack, tag, "unlearn_relearn", c + self._dbr_out(attack, tag) +
                         ["--lr", lr, "--epochs", self.e(epochs)])
        for bound in ("2.3",):
            for lr in ("1e-3", "3e-3"):
                tag = f"dbr_bound{bound}_lr{lr}_e100"
                self.run(attack, tag, "unlearn_relearn", c + self._dbr_out(attack, tag) +
                         ["--lr", lr, "--epochs", self.e(100), "--ascent_bound", bound])

    def strong_phase(self, attack):
        """The stronger backdoored model of REFERENCE.md: width 32, 60 withTrans epochs; split from w16 SD."""
        c = self.common(attack, width=32)
        self.run(attack, "withTrans_w32", "train_attack_withTrans",
                 c + ["--epochs", self.e(60), "--schedule", self.e(30), self.e(45), "--overwrite"])
        for lr, epochs, extra in (("1e-4", 100, []), ("1e-3", 60, ["--ascent_bound", "2.3"])):
            tag = f"dbr_w32_lr{lr}_e{epochs}" + ("_bound" if extra else "")
            self.run(attack, tag, "unlearn_relearn", c + ["--sd_width", "16"] + self._dbr_out(attack, tag) +
                     ["--lr", lr, "--epochs", self.e(epochs)] + extra)

    def dst_phase(self, attack):
        c = self.common(attack)
        for undefended in (False, True):
            extra = ["--undefended"] if undefended else []
            tag = "dst_undefended" if undefended else "dst"
            self.run(attack, tag + "_extractor", "ST.train_extractor",
                     c + extra + ["--epochs", self.e(self.opt.dst_epochs), "--overwrite"])
            self.run(attack, tag + "_classifier", "ST.train_classifier", c + extra + ["--epochs", self.e(10), "--overwrite"])
            self.run(attack, tag + "_test", "ST.test", c + extra)

    def _dbr_out(self, attack, tag):
        d = Path(self.opt.save_root) / "dbr_study" / attack
        return ["--checkpoint_save", str(d / f"{tag}.tar"), "--log", str(d / f"{tag}.csv"), "--overwrite"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_file", default=None)
    p.add_argument("--save_root", default="./saved/suite")
    p.add_argument("--out", default="./saved/suite_out")
    p.add_argument("--device", default="auto")
    p.add_argument("--plan", nargs="+", default=["main:all", "dst:badnets", "study:badnets,blend", "strong:all",
                                                  "dst:trojan,blend,kitty,badnets_all2all,sig,cl"],
                   help="phase:attack,attack,... in order of priority (phases: main study strong dst)")
    p.add_argument("--dst_epochs", type=int, default=60)
    p.add_argument("--epoch_scale", type=float, default=1.0, help="multiplies every epoch count (smoke tests)")
    p.add_argument("--budget", type=float, default=540, help="seconds; later phases are skipped past it")
    return p


def main(opt):
    suite = Suite(opt)
    plan = []
    for entry in opt.plan:
        phase, _, names = entry.partition(":")
        names = list(PAPER_ATTACKS) if names in ("", "all") else names.split(",")
        plan += [(phase, a) for a in names]
    for phase, attack in plan:
        if suite.left() < 20:
            print(f"[suite] time budget spent: skipping {phase} {attack}", flush=True)
            continue
        try:
            getattr(suite, f"{phase}_phase")(attack)
        except Exception as err:  # noqa: BLE001 - record and go on with the next attack
            with open(suite.summary, "a") as f:
                f.write(json.dumps({"attack": attack, "step": phase, "error": repr(err)}) + "\n")
            print(f"[suite] {phase} {attack} failed: {err!r}", flush=True)


if __name__ == "__main__":
    main(build_parser().parse_args())
