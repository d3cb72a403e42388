"""SD step 1: train a backdoored model on the poisoned set WITHOUT data augmentation (SPEC 3.1).

Paper: SGD lr 0.01, momentum 0.9, wd 5e-4, batch 128, cosine schedule with a 100-epoch period,
2 epochs (on 50,000 images; on the 5,170-image subset use --epochs 20 for as many SGD steps).
"""
from utils.args import build_parser as shared_parser
from utils.errors import run_main
from utils.paths import backdoor_dir
from utils.train import train_model


def build_parser():
    return shared_parser(__doc__, step="noTrans", save_freq=1)


def main(args):
    return train_model(args, "train_attack_noTrans.py", backdoor_dir(args, "noTrans"),
                       augment=None, schedule="cosine")


if __name__ == "__main__":
    run_main(main, build_parser())
