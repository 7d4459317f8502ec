"""Backbones through timm.create_model, and loading of initial weights with exact key checks."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Optional

import timm
import torch
from safetensors.torch import load_file
import yaml
from torch import nn

from ssvit import objectives
from ssvit.errors import UsageError


def create_backbone(name: str, img_size: int, model_kwargs: Optional[dict] = None) -> nn.Module:
    """A timm model without its classifier (num_classes=0): the objective owns the head."""
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models('vit_*')."
        raise UsageError(f"Unknown timm model {name!r}.{hint}")
    kwargs = dict(model_kwargs or {}, num_classes=0)
    kwargs.pop("img_size", None)  # the run's img_size decides
    try:
        try:
            model = timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            model = timm.create_model(name, **kwargs)  # convolutional models (BiT) take any input size
    except TypeError as e:
        bad = str(e).rpartition("argument ")[2].strip("'")
        raise UsageError(f"--model {name} does not take {bad!r} (from --model_kwargs {model_kwargs}): {e}. "
                         f"Remove it from --model_kwargs.") from None  # fmt: skip
    embed = getattr(model, "patch_embed", None)
    if embed is not None and hasattr(embed, "grid_size"):
        stride = img_size / embed.grid_size[0]
        if img_size % embed.grid_size[0] or stride != int(stride) or embed.grid_size[0] * int(stride) != img_size:
            raise UsageError(
                f"Image size {img_size} is not divisible by the patch size of {name} "
                f"(patch_size={getattr(embed, 'patch_size', '?')}). Choose --img_size as a multiple of the "
                f"patch size, or set --model_kwargs '{{patch_size: P}}' to one that divides {img_size}."
            )
    return model


def set_fused_attention(model: nn.Module, fused: Optional[bool], device_type: str, precision: Optional[str]) -> bool:
    """Choose timm's attention path: fused (PyTorch scaled_dot_product_attention) or explicit matmuls.

    None picks fused except on CPU under bf16, where PyTorch's flash-attention backward dominates a ViT-Ti/4
    step (40% of it when profiled); the explicit path made that step 1.6x faster (docs/performance.md)."""
    if fused is None:
        fused = not (device_type == "cpu" and precision == "bf16")
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return fused


def describe(model: nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}, {params / 1e6:.2f}M parameters"


def safetensors_problem(path: Path) -> Optional[tuple[str, str]]:
    """("damaged", why) for a safetensors file cut short or with a broken header, ("not safetensors", why) for
    another format, None when its header and size agree (the tensors' bytes are not read)."""
    import json

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= 100 * 2**20:
            return "not safetensors", "it does not start with a safetensors header"
        header = f.read(n)
    if not header.lstrip().startswith(b"{"):
        return "not safetensors", "it does not start with a safetensors header"
    if len(header) < n:
        return "damaged", f"cut short: {size:,} bytes, its header alone has {8 + n:,}"
    try:
        meta = json.loads(header)
        end = max([v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"] or [0])
    except (ValueError, KeyError, TypeError, IndexError):
        return "damaged", "its header is not valid"
    if 8 + n + end != size:
        return "damaged", f"{'cut short' if 8 + n + end > size else 'longer than its header says'}: {size:,} bytes, {8 + n + end:,} expected"
    return None


def read_state_dict(path: str | Path, header_only: bool = False) -> dict[str, torch.Tensor]:
    """Weights from an ssvit checkpoint folder, an exported backbone folder, or a .safetensors file.
    Never unpickles: safetensors only. header_only: check that the file is readable, load nothing."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if p.is_dir():
        candidates = [p / "model.safetensors", p / "backbone.safetensors"]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise FileNotFoundError(f"{p} has no model.safetensors: is it an ssvit checkpoint or exported backbone?")
        p = found
    if not p.exists():
        raise FileNotFoundError(f"Checkpoint {p} does not exist.")
    problem = safetensors_problem(p)
    if problem and problem[0] == "damaged":
        raise UsageError(f"{p} is damaged ({problem[1]}): copy it again, or use an earlier checkpoint.")
    try:
        if header_only:
            with safe_open(p, "pt"):
                return {}
        return load_file(p)
    except (SafetensorError, OSError) as e:
        raise UsageError(
            f"{p} is not a safetensors file ({e}). ssvit loads weights from .safetensors only (it never unpickles): "
            f"give an ssvit checkpoint or an exported backbone folder, or convert the weights to safetensors."
        ) from None


def released_prefix(checkpoint: str | Path, state: dict[str, torch.Tensor], key: Optional[str] = None,
                    flag: str = "--checkpoint_key") -> str:
    """The key prefix of the backbone weights to read from an ssvit checkpoint: `key` (--checkpoint_key: a backbone
    the checkpoint holds, such as DINO's student "backbone" or MoCo v3's "momentum_backbone"), else the one its
    objective releases (released_prefix(): the trained backbone, or e.g. DINO's momentum teacher)."""
    saved = saved_config(checkpoint) or {}
    source = objectives.OBJECTIVES.get(saved.get("objective") or "")
    released = "backbone." if source is None else source.released_prefix()
    if key is None:
        return released
    prefix = f"{key.removesuffix('.')}."
    inner = {k.removeprefix(released) for k in state if k.startswith(released)}  # a backbone's own keys
    # Every prefix under which the checkpoint holds all of them (e.g. FixMatch's teacher.backbone, under teacher).
    held = sorted({k.removesuffix(i) for k in state for i in (k.partition(".")[2], k.split(".", 2)[-1]) if i in inner})
    held = [p for p in held if all(p + i in state for i in inner)]
    if prefix not in held:
        backbones = ", ".join(p.removesuffix(".") for p in held)
        fix = f"its backbones are: {backbones}" if held else f"it holds one backbone (an exported model): drop {flag}"
        raise UsageError(f"{flag} {key}: {checkpoint} has no backbone under it; {fix}.")
    return prefix


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], source: str, prefix: str = "backbone.") -> None:
    """Load backbone weights from an ssvit checkpoint (keys <prefix>*, backbone.* by default) or a bare timm state
    dict.

    The objective's head is always new, so only keys outside the backbone may be left over; anything else
    (a missing backbone key, a shape mismatch) means another architecture and is an error naming the keys."""
    if any(k.startswith(prefix) for k in state):
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    own = backbone.state_dict()
    # Position embeddings trained at another resolution are resampled in 2-D (timm), class token kept.
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], backbone)
    # Only a classifier may be left over (a fine-tuned or timm model's head): the objective brings its own.
    check_compatible(own, state, source, type(backbone).__name__, ignore_unexpected=("head.", "fc_norm."))
    backbone.load_state_dict({k: state[k] for k in own}, strict=True)


def check_compatible(own: dict, state: dict, source: str, target: str, ignore_unexpected: tuple = ()) -> None:
    """Raise a ValueError naming the missing, unexpected and mis-shaped keys when `state` does not fit `own`."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in set(state) - set(own) if not k.startswith(ignore_unexpected or ("\0",)))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if not (missing or mismatched or unexpected):
        return
    lines = [f"The weights in {source} do not fit {target}:"]
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected)):
        if keys:
            lines.append(f"  {what} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}):")
        lines += [f"    {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:8]]
    lines.append("Use the --model, --model_kwargs and --objective the checkpoint was trained with (see its config.yaml).")
    raise UsageError("\n".join(lines))


def resample_pos_embed(pos_embed: torch.Tensor, backbone: nn.Module) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
    return resample_abs_pos_embed(pos_embed, new_size=list(backbone.patch_embed.grid_size), num_prefix_tokens=prefix)


# ----------------------------------------------------------------------------------------------------------
# --init: where a run's first weights come from


def saved_config(checkpoint: str | Path) -> Optional[dict]:
    """The config saved beside an ssvit checkpoint or its run (config.yaml), or beside an exported backbone
    (timm's config.json), as a plain dict; None when there is none."""
    p = Path(checkpoint)
    folder = p if p.is_dir() else p.parent
    for f in (folder, *folder.parents[:2]):
        if (f / "config.yaml").exists():
            return yaml.safe_load((f / "config.yaml").read_text())
        if (f / "config.json").exists():
            return json.loads((f / "config.json").read_text())
    return None


def pooling_for(source_objective: Optional[str], model_kwargs: dict) -> dict:
    """The pooling a classifier on a backbone that `source_objective` trained inherits (the objective's
    classifier_pooling, e.g. the mean patch token), unless model_kwargs choose one; nothing for an unknown objective."""
    source = objectives.OBJECTIVES.get(source_objective or "")
    return dict(source.classifier_pooling) if source is not None and "global_pool" not in model_kwargs else {}


def init_architecture(init: str) -> dict:
    """The TrainConfig fields (model, model_kwargs, img_size) that rebuild the architecture of an --init source:
    timm:<name>, an ssvit checkpoint (its config.yaml) or an exported backbone folder (timm's config.json)."""
    if init.startswith("timm:"):
        return {"model": init[5:], "model_kwargs": {}}
    if not Path(init).exists():
        raise FileNotFoundError(f"--init {init}: no such file or folder. Give an ssvit checkpoint folder "
                                f"(runs/<name>/checkpoints/step_NNNNNN), an exported backbone folder, or timm:<name>.")  # fmt: skip
    saved = saved_config(init)
    if saved is None:
        raise FileNotFoundError(f"--init {init}: no config.yaml or config.json beside it to take the architecture from.")
    if "architecture" in saved:  # a timm folder (python -m ssvit.export)
        model_args = dict(saved.get("model_args", {}))
        size = model_args.pop("img_size", None) or saved.get("pretrained_cfg", {}).get("input_size", [0, 0, None])[-1]
        if isinstance(size, (list, tuple)):  # timm writes (height, width); ssvit trains square images
            size = size[0] if len(set(size)) == 1 else None  # not square: --img_size decides
        return {"model": saved["architecture"], "model_kwargs": model_args, **({"img_size": size} if size else {})}
    return {k: saved[k] for k in ("model", "model_kwargs", "img_size", "data") if k in saved}


def load_init(backbone: nn.Module, init: str, checkpoint_key: Optional[str] = None,
              flag: str = "--init_checkpoint_key") -> dict[str, torch.Tensor]:
    """Load --init into the backbone: timm:<name> (timm's pretrained weights, needs internet) or a path (an ssvit
    checkpoint: the weights its objective releases, or the backbone checkpoint_key names). Returns the whole
    state dict it read (Objective.on_init takes what else it wants of it, such as a classifier's head)."""
    if init.startswith("timm:"):
        source, prefix = timm.create_model(init[5:], pretrained=True, num_classes=0).state_dict(), "backbone."
    else:
        source = read_state_dict(init)
        prefix = released_prefix(init, source, checkpoint_key, flag)
    load_backbone_weights(backbone, source, init, prefix)
    return source


def checkpoint_folder(path: str | Path) -> Path:
    """The folder of an ssvit checkpoint (model.safetensors beside a config.yaml), or a ValueError that says what is."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if not (folder / "model.safetensors").exists() or saved_config(folder) is None:
        raise UsageError(
            f"{path} is not an ssvit checkpoint (expected a folder with model.safetensors and config.yaml, such as "
            f"runs/<name>/checkpoints/step_001000)."
        )
    return folder


def build_timm_model(checkpoint: str | Path, with_head: bool = False, use_ema: bool = True,
                     checkpoint_key: Optional[str] = None) -> tuple[nn.Module, dict]:  # fmt: skip
    """The plain timm model held by an ssvit checkpoint (EMA weights when kept; the backbone its objective releases,
    or the one checkpoint_key names), and the model_args that rebuild it."""
    folder = checkpoint_folder(checkpoint)
    cfg = saved_config(folder)
    weights = folder / ("ema.safetensors" if use_ema and (folder / "ema.safetensors").exists() else "model.safetensors")
    state = read_state_dict(weights)
    model_args = dict(cfg.get("model_kwargs") or {})
    model_args |= pooling_for(cfg.get("objective"), model_args)  # exported, read as fine-tuning reads it
    model = create_backbone(cfg["model"], cfg["img_size"], model_args)
    if hasattr(model, "patch_embed"):
        model_args["img_size"] = cfg["img_size"]
    load_backbone_weights(model, state, str(weights), released_prefix(folder, state, checkpoint_key))
    if with_head:
        if "head.weight" not in state or state["head.weight"].ndim != 2:
            raise UsageError(
                f"--with_head: {folder} has no linear classifier to export (objective {cfg['objective']!r}). Export the "
                f"backbone (without --with_head), or export a checkpoint of ssvit/finetune.py."
            )
        model.reset_classifier(state["head.weight"].shape[0])
        classifier = model.get_classifier()
        classifier.weight.data.copy_(state["head.weight"].view_as(classifier.weight))  # ResNetV2's head is a 1x1 conv
        classifier.bias.data.copy_(state["head.bias"])
    return model.eval(), model_args
