"""Export a backbone from an ssvit checkpoint as a folder that timm loads with nothing of ssvit installed.

    python -m ssvit.export runs/cifar10_mpp_cpu/checkpoints/step_001500 --out exported/mpp_vit_ti4
    python -c "import timm; m = timm.create_model('local-dir:exported/mpp_vit_ti4', pretrained=True)"

The folder holds timm's config.json (architecture, model_args, pretrained_cfg) and model.safetensors, a bare
state dict that also works as timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...)).
The default is the backbone without a head (num_classes=0); --with_head keeps a fine-tuned linear classifier.
When the run kept EMA weights, those are exported (--no_ema for the raw weights).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ssvit.config import saved_train_config
from ssvit.cli import make_parser, parse_args
from ssvit.errors import UsageError, command
from ssvit.models import build_timm_model, checkpoint_folder


def export_onnx(model, size: int, path: Path, output_name: str) -> Path:
    """model.onnx with input pixel_values (batch, 3, size, size), normalised as the timm model expects, and a
    dynamic batch axis (torch's exporter; `pip install -e ".[onnx]"`)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UsageError(f"--onnx needs the onnx extra ({e.name} is not installed): pip install -e \".[onnx]\"") from None
    torch.onnx.export(model, (torch.rand(1, 3, size, size),), str(path), input_names=["pixel_values"],
                      output_names=[output_name], dynamic_axes={"pixel_values": {0: "batch"}})  # fmt: skip
    return path


def check_out(checkpoint, out: Path, overwrite: bool) -> None:
    """--out must not be, hold or lie inside the checkpoint (a replaced --out is deleted), and an existing one is
    replaced only with --overwrite."""
    src, dst = checkpoint_folder(checkpoint).resolve(), out.resolve()
    where = ("is the checkpoint" if dst == src else "holds the checkpoint" if dst in src.parents
             else "lies inside the checkpoint" if src in dst.parents else None)  # fmt: skip
    if where:
        raise UsageError(f"--out {out} {where} {checkpoint}: exporting there would replace what it reads. Choose a "
                         f"folder outside it, e.g. --out {src.parent.parent.parent / 'exported'}.")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a folder.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite.")


def export(checkpoint, out, with_head=False, use_ema=True, overwrite=False, push_to_hub=None, onnx=False,
           checkpoint_key=None) -> Path:
    """Write the timm folder next to --out first and put it in place last: a failed export leaves an existing
    --out as it was."""
    import timm.models

    out = Path(out)
    check_out(checkpoint, out, overwrite)
    model, model_args = build_timm_model(checkpoint, with_head, use_ema, checkpoint_key)
    tmp = out.with_name(f".{out.name}.exporting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        timm.models.save_for_hf(model, str(tmp), model_args=model_args, safe_serialization=True)
        if onnx:
            size = saved_train_config(checkpoint).img_size  # the resolution the run trained at (BiT takes any)
            export_onnx(model, size, tmp / "model.onnx", "logits" if with_head else "features")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    if push_to_hub:
        timm.models.push_to_hf_hub(model, push_to_hub, model_args=model_args)
    return out


def run_command(argv=None) -> Path:
    p = make_parser("ssvit-export", __doc__)
    p.add_argument("checkpoint", help="an ssvit checkpoint folder (runs/<name>/checkpoints/step_NNNNNN)")
    p.add_argument("--out", required=True, help="folder to write (timm local-dir layout)")
    p.add_argument("--with_head", action="store_true", help="keep the fine-tuned linear classifier")
    p.add_argument("--no_ema", action="store_true", help="export the raw weights even if EMA weights exist")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--push_to_hub", metavar="REPO_ID", help="also upload through huggingface_hub")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx with a dynamic batch axis (the onnx extra)")
    p.add_argument("--checkpoint_key", metavar="NAME",
                   help="export this backbone of the checkpoint (e.g. backbone: DINO's student; momentum_backbone: MoCo v3's "
                        "momentum encoder; teacher.backbone: FixMatch's EMA teacher); default: the one its objective releases")
    args = parse_args(p, argv)
    out = export(args.checkpoint, args.out, args.with_head, not args.no_ema, args.overwrite, args.push_to_hub, args.onnx,
                 args.checkpoint_key)  # fmt: skip
    print(f"Exported to {out}. Load it with: timm.create_model('local-dir:{out}', pretrained=True)")
    return out


main = command("ssvit-export")(run_command)


if __name__ == "__main__":
    main()
