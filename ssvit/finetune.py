"""Fine-tune a pretrained backbone with the ViT paper's transfer protocol (section 3.2, App. B.1.1).

    accelerate launch ssvit/finetune.py --init runs/cifar10_mpp_cpu/checkpoints/step_001500 --data parquet:PATH
    accelerate launch ssvit/finetune.py --init runs/x/checkpoints/step_001500 --img_size 64   # 2x resolution

The same loop and flags as pretraining, with the paper's fine-tuning defaults: the pretraining head is dropped
and a zero-initialised linear head attached; SGD with momentum 0.9, cosine decay, no weight decay, gradient
clipping at global norm 1. The architecture is taken from the checkpoint's config unless --model is given;
at another --img_size the position embeddings are resampled in 2-D (timm; the class token is kept).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: the repo root, not ssvit/, whose inspect.py would shadow the stdlib
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


from accelerate import PartialState  # noqa: E402

from ssvit.config import parse  # noqa: E402
from ssvit.models import run_config_of  # noqa: E402
from ssvit.pretrain import print_summary  # noqa: E402
from ssvit.train import train  # noqa: E402

FINETUNE_DEFAULTS = {
    "objective": "supervised",
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 0.0,
    "lr": 0.01,
    "lr_scheduler_type": "cosine",
    "max_grad_norm": 1.0,
    "warmup_steps": 50,
    "max_steps": 500,
    "batch_size": 128,
    "output_dir": "runs/finetune",
    "supervised.head": "linear",
    "supervised.zero_init_head": True,
}


def defaults_from_init(argv: list[str]) -> dict:
    """The architecture and resolution of the --init checkpoint (ssvit config.yaml or timm config.json)."""
    init = next((a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv) if a.split("=")[0] == "--init"), None)
    if init is None and ("--help" in argv or "-h" in argv):
        return {}
    if init is None:
        raise SystemExit("finetune: --init is required (an ssvit checkpoint, an exported backbone folder, or timm:<name>).")
    if init.startswith("timm:"):
        return {"model": init[5:], "model_kwargs": {}}
    saved = run_config_of(init)
    if saved is None:
        raise FileNotFoundError(f"--init {init}: no config.yaml or config.json beside it; give --model explicitly.")
    if "architecture" in saved:  # a timm folder (python -m ssvit.export)
        model_args = dict(saved.get("model_args", {}))
        size = model_args.pop("img_size", None) or saved.get("pretrained_cfg", {}).get("input_size", [0, 0, None])[-1]
        return {"model": saved["architecture"], "model_kwargs": model_args, **({"img_size": size} if size else {})}
    return {k: saved[k] for k in ("model", "model_kwargs", "img_size", "data") if k in saved}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    run = parse(argv, defaults={**FINETUNE_DEFAULTS, **defaults_from_init(argv)}, prog="ssvit-finetune")
    result = train(run)
    if PartialState().is_main_process:
        print_summary(result, run.train.output_dir)
    return result


if __name__ == "__main__":
    main()
