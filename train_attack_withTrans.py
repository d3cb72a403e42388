"""BR step 1: train the backdoored model a victim would get, WITH classical augmentation (SPEC 5.1).

CIFAR: random crop (padding 4) + horizontal flip (CIFAR-100 adds rotation 15 deg), SGD lr 0.01,
momentum 0.9, wd 5e-4, batch 128, 200 epochs, lr x 0.1 at epochs 100 and 150.
ImageNet subset (this same script, --dataset imagenet): rotation 20 deg + flip; the paper used
--epochs 25 --lr 0.001 --schedule 15 20 from ImageNet-pretrained weights.
"""
from utils.args import build_parser as shared_parser
from utils.augment import train_augmentation
from utils.errors import run_main
from utils.paths import backdoor_dir
from utils.train import train_model


def build_parser():
    return shared_parser(__doc__, step="withTrans", save_freq=20)


def main(args):
    return train_model(args, "train_attack_withTrans.py", backdoor_dir(args, "withTrans"),
                       augment=train_augmentation(args.dataset), schedule="step")


if __name__ == "__main__":
    run_main(main, build_parser())
