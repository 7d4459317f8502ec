"""Pretrain a ViT (or BiT) with any registered objective.

    accelerate launch ssvit/pretrain.py --objective masked_patch
    accelerate launch ssvit/pretrain.py --config cifar10_mpp_cpu --data parquet:/data/cifar10
    ssvit pretrain --objective supervised --model resnetv2_50x1_bit --data parquet:PATH
"""

from __future__ import annotations

from accelerate import PartialState

from ssvit.config import parse
from ssvit.errors import command
from ssvit.train import print_summary, train


def run_command(argv=None) -> dict:
    run = parse(argv, prog="ssvit-pretrain")
    result = train(run)
    if PartialState().is_main_process:
        print_summary(result, run.train.output_dir)
    return result


main = command("ssvit-pretrain")(run_command)


if __name__ == "__main__":
    main()
