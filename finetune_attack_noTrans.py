"""SD step 2: fine-tune the noTrans backdoored model with the intra-class loss L_intra (SPEC 3.2).

Continues the noTrans checkpoint (model, optimiser and schedule state) for 10 epochs in train
mode, minimising the mean cosine similarity between the class centres of each batch. This widens
the gap between genuinely clean target-class samples and poisoned samples.
"""
from utils.args import build_parser as shared_parser
from utils.errors import run_main, UserError
from utils.fct import intra_class_criterion
from utils.paths import backdoor_dir, latest_checkpoint
from utils.train import train_model


def build_parser():
    return shared_parser(__doc__, step="finetune", save_freq=1)


def main(args):
    start = args.checkpoint_load or latest_checkpoint(backdoor_dir(args, "noTrans"))
    if start is None:
        raise UserError(f"no noTrans model in {backdoor_dir(args, 'noTrans')}; run train_attack_noTrans.py "
                        "first or pass --checkpoint_load")
    print(f"fine-tuning {start}")
    return train_model(args, "finetune_attack_noTrans.py", backdoor_dir(args, "noTrans_ftsimi"),
                       criterion=intra_class_criterion, schedule="cosine", init_checkpoint=start)


if __name__ == "__main__":
    run_main(main, build_parser())
