"""Fine-tune a pretrained backbone with the ViT paper's transfer protocol (section 3.2, App. B.1.1).

    accelerate launch ssvit/finetune.py --init runs/cifar10_mpp_cpu/checkpoints/step_001500 --data parquet:PATH
    accelerate launch ssvit/finetune.py --init runs/x/checkpoints/step_001500 --img_size 64   # 2x resolution

The same loop and flags as pretraining, with the paper's fine-tuning defaults (configs/finetune.yaml): the
pretraining head is dropped and a zero-initialised linear head attached; SGD with momentum 0.9, cosine decay,
no weight decay, gradient clipping at global norm 1. The architecture is taken from the --init checkpoint
unless --model is given; at another --img_size the position embeddings are resampled in 2-D (timm; the class
token is kept).
"""

from __future__ import annotations

import sys

from accelerate import PartialState

from ssvit.config import finetune_defaults, parse
from ssvit.errors import command
from ssvit.train import print_summary, train


def run_command(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    run = parse(argv, defaults=finetune_defaults(argv), prog="ssvit-finetune")
    result = train(run)
    if PartialState().is_main_process:
        print_summary(result, run.train.output_dir)
    return result


main = command("ssvit-finetune")(run_command)


if __name__ == "__main__":
    main()
