"""Frozen-feature evaluation: few-shot linear (ViT paper, section 4.1), linear probe and k-NN.

    ssvit evaluate --init runs/cifar10_mpp_cpu/checkpoints/step_001500
    ssvit evaluate --init timm:vit_base_patch16_224 --img_size 224 --data parquet:/data/cifar10

Few-shot: regularised least squares from frozen features to {-1, 1}^K targets, solved in closed form, for
1/5/10/25 images per class and several seeds (mean and spread), as big_vision's fewshot_lsr evaluator does it
(ssvit/features.py). Writes evaluation.json and a Markdown table beside the checkpoint.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from ssvit.cli import make_parser, parse_args
from ssvit.errors import command
from ssvit.features import evaluate_backbone, format_table, representation_for


def run_command(argv=None) -> dict:
    from ssvit.config import TrainConfig, saved_train_config
    from ssvit.data import load_splits
    from ssvit.models import create_backbone, load_init
    from ssvit.train import cpu_has_bf16, share_cores

    p = make_parser("ssvit-evaluate", __doc__)
    p.add_argument("--init", required=True, help="ssvit checkpoint folder, or timm:<name> (with --img_size and --data)")
    p.add_argument("--img_size", type=int, default=None, help="with timm:<name> (default 224)")
    p.add_argument("--data", default=None, help="as in pretraining (default: the checkpoint's own data)")
    p.add_argument("--representation", default="auto", choices=["auto", "cls", "mean", "prelogits"])
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max_train", type=int, default=10_000, help="training images for probe, k-NN and --lsq")
    p.add_argument("--lsq", action="store_true",
                   help="also the closed-form least-squares read-out on all those training images, its L2 by leave-one-out "
                        "on them (the budget studies' +lsq)")  # fmt: skip
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--bf16", action="store_true", help="extract features under bf16 autocast")
    p.add_argument("--output", default=None, help="JSON file (default: evaluation.json beside the checkpoint)")
    p.add_argument("--random_init", action="store_true",
                   help="evaluate the checkpoint's architecture at random initialisation: the no-pretraining reference")  # fmt: skip
    p.add_argument("--checkpoint_key", metavar="NAME",
                   help="evaluate this backbone of the checkpoint (e.g. backbone: DINO's student; momentum_backbone: MoCo v3's "
                        "momentum encoder; teacher.backbone: FixMatch's EMA teacher); default: the one its objective releases")
    args = parse_args(p, argv)

    trained_by = None  # a timm model: no objective of ssvit's names its representation (auto reads its pre-logits)
    if args.init.startswith("timm:"):  # its pretrained weights, or --random_init
        cfg = TrainConfig(model=args.init[5:], model_kwargs={}, img_size=args.img_size or 224)
    else:
        cfg = saved_train_config(args.init)
        trained_by = cfg.objective
    if args.data:
        cfg.data = args.data
    share_cores(cfg.cpu_threads)  # every core, also under accelerate launch (which sets OMP_NUM_THREADS=1)
    torch.manual_seed(0)  # a reproducible random initialisation for --random_init
    backbone = create_backbone(cfg.model, cfg.img_size, cfg.model_kwargs)
    if not args.random_init:
        load_init(backbone, args.init, args.checkpoint_key, "--checkpoint_key")
    splits = load_splits(cfg)
    rep = representation_for(trained_by, args.representation)
    result = {"checkpoint": "random initialisation" if args.random_init else str(args.init), "data": splits.description}
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # features on the GPU, solves on the CPU
    if args.bf16 and device.type == "cpu" and not cpu_has_bf16():
        print("This CPU has no bf16 matrix units: --bf16 would be hundreds of times slower here; extracting in fp32.")
        args.bf16 = False
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        result |= evaluate_backbone(backbone.to(device), splits, rep, tuple(args.shots), tuple(range(args.seeds)),
                                    max_train=args.max_train, device=device, batch_size=args.batch_size, lsq=args.lsq)  # fmt: skip
    result["seconds"] = time.perf_counter() - start
    result["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    init = Path(args.init)
    name = "evaluation_random_init.json" if args.random_init else "evaluation.json"
    folder = Path(".") if args.init.startswith("timm:") else (init if init.is_dir() else init.parent)
    out = Path(args.output) if args.output else folder / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(format_table(result) + "\n")
    print(format_table(result))
    print(f"\nWritten: {out} and {out.with_suffix('.md')}")
    return result


main = command("ssvit-evaluate")(run_command)


if __name__ == "__main__":
    main()
