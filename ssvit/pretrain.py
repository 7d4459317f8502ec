"""Pretrain a ViT (or BiT) with any registered objective.

    accelerate launch ssvit/pretrain.py --objective masked_patch
    accelerate launch ssvit/pretrain.py --config configs/cifar10_mpp_cpu.yaml
    python -m ssvit.pretrain --objective supervised --model resnetv2_50x1_bit --data parquet:PATH
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: the repo root, not ssvit/, whose inspect.py would shadow the stdlib
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


from accelerate import PartialState  # noqa: E402

from ssvit.config import parse  # noqa: E402
from ssvit.train import train  # noqa: E402


def main(argv=None) -> dict:
    run = parse(argv, prog="ssvit-pretrain")
    result = train(run)
    if PartialState().is_main_process:
        print_summary(result, run.train.output_dir)
    return result


def print_summary(result: dict, output_dir: str) -> None:
    metrics = {k.removeprefix("val/"): v for k, v in result.items() if k.startswith("val/")}
    print("\nValidation:", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    ckpt = result["checkpoint"]
    print(f"Checkpoint: {ckpt}")
    print(f"Results:    {output_dir}/results.json, metrics.jsonl, figures/")
    print("Next:")
    print(f"  fine-tune: accelerate launch ssvit/finetune.py --init {ckpt}")
    print(f"  evaluate:  python -m ssvit.evaluate --init {ckpt}")
    print(f"  export:    python -m ssvit.export {ckpt} --out {output_dir}/exported")
    print(f"  inspect:   python -m ssvit.inspect {ckpt} --out {output_dir}/inspect")


if __name__ == "__main__":
    main()
