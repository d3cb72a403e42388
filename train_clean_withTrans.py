"""Train a clean model (no poisoning) with the withTrans recipe (SPEC 6).

The CL attack (fourCornerTrigger) perturbs its poisoned training images with PGD against this
model; trigger/make_trojan_trigger.py optimises the Trojan patch against it.
"""
from utils.args import build_parser as shared_parser
from utils.augment import train_augmentation
from utils.errors import run_main
from utils.paths import clean_model_dir
from utils.train import train_model


def build_parser():
    return shared_parser(__doc__, step="clean_model", save_freq=20)


def main(args):
    return train_model(args, "train_clean_withTrans.py", clean_model_dir(args),
                       augment=train_augmentation(args.dataset), schedule="step", poison=False)


if __name__ == "__main__":
    run_main(main, build_parser())
