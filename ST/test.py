"""D-ST step 3: ACC, ASR, ASR0 and R-ACC of a trained extractor + classifier pair (SPEC 4.3, 1).

ACC on the whole clean test split (ACC_nontarget: on the non-target images, the set the original
reported); ASR / R-ACC on the backdoor test set; ASR0 on its clean versions (the model's base rate
for the target class). Printed and appended as one CSV row to --log, by default test.csv in the
attack's D-ST folder (beside the SupCon_ and Linear_ run folders; the last row is the latest test).
Both checkpoints must load completely (strict keys, same data / model / attack) or nothing runs.
"""
import time
from pathlib import Path

from utils.args import build_parser as shared_parser
from utils.args import resolve_device
from utils.checkpoint import read_checkpoint
from utils.errors import run_main
from utils.logger import CSVLogger, print_header
from utils.st import (add_classifier_recipe_flags, add_st_flags, classifier_dir, default_extractor, load_classifier,
                      load_extractor, prepare_args, st_run_root)
from utils.train import evaluate, format_metrics, load_attack_data, make_runtime, prepare_model, seed_everything

COLUMNS = ["Test_ACC", "Test_ASR", "Test_ASR0", "Test_R-ACC", "Test_ACC_nontarget", "Seconds", "model_ckpt",
           "classifier_ckpt"]


def build_parser():
    # the optimisation flags name the classifier run whose last.pth is tested by default
    p = shared_parser(__doc__, groups=("data", "attack", "model", "optim", "io", "sd"), step="st_test", lr=5.0, weight_decay=0.0,
                      batch_size=512)
    g = add_st_flags(p, "test")
    g.add_argument("--model_ckpt", default=None,
                   help="feature extractor (default: the one the classifier checkpoint was trained on)")
    g.add_argument("--classifier_ckpt", default=None,
                   help="classifier (default: last.pth of the train_classifier.py run with these flags)")
    add_classifier_recipe_flags(p.add_argument_group("classifier recipe (names the classifier run to test)"))
    return p


def main(args):
    prepare_args(args)
    t0 = time.time()
    rt = make_runtime(args, resolve_device(args))
    classifier_path = Path(args.classifier_ckpt or classifier_dir(args) / "last.pth")
    model_path = args.model_ckpt or (read_checkpoint(classifier_path).get("extractor") if classifier_path.is_file()
                                     else None) or default_extractor(args)
    extractor, _ = load_extractor(model_path, args)
    model, _ = load_classifier(classifier_path, args, extractor.encoder)
    print_header("ST/test.py", args)
    seed_everything(args.seed)
    _, tests = load_attack_data(args, rt)
    m = evaluate(prepare_model(model, rt), tests, rt, args.target_label)
    print(f"extractor {model_path}\nclassifier {classifier_path}\n{format_metrics(m)}  "
          f"(ACC on non-target images {m['Test_ACC_nontarget']:.2f})")
    row = {k: m[k] for k in COLUMNS[:5]}
    row.update({"Seconds": time.time() - t0, "model_ckpt": str(model_path), "classifier_ckpt": str(classifier_path)})
    log_path = args.log or st_run_root(args) / "test.csv"
    CSVLogger(log_path, COLUMNS, append=True, recipe=args.recipe).write(row)
    print(f"written {log_path}")
    return row


if __name__ == "__main__":
    run_main(main, build_parser())
