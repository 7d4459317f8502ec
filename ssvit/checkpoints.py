"""Checkpoints: writing, rotation, the best one, and loading for --resume.

A checkpoint is ``checkpoints/step_NNNNNN/``: ``accelerator.save_state`` (model.safetensors, optimizer, every
process's RNG state) plus ``trainer_state.json``, ``config.yaml`` and ``ema.safetensors``. It is written under
``step_NNNNNN.tmp`` and renamed, so a kill mid-save never destroys the previous checkpoint. (Accelerate's
``automatic_checkpoint_naming`` writes in place, without that guarantee, so it is not used.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Optional

from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from ssvit.config import RunConfig, TrainConfig
from ssvit.models import check_compatible, read_state_dict


def checkpoints_in(output_dir: Path) -> list[Path]:
    folder = output_dir / "checkpoints"
    found = [p for p in folder.glob("step_*") if p.is_dir() and p.name[5:].isdigit()] if folder.exists() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def resolve_resume(cfg: TrainConfig) -> Optional[Path]:
    """The checkpoint --resume names: 'latest' (a bare --resume), 'auto' (latest if any), or a path."""
    if cfg.resume is None:
        return None
    if cfg.resume in ("latest", "auto", "true", "True"):
        found = checkpoints_in(Path(cfg.output_dir))
        if not found:
            if cfg.resume == "auto":
                return None
            raise FileNotFoundError(f"--resume: no checkpoint in {cfg.output_dir}/checkpoints to resume from.")
        return found[-1]
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"--resume {path}: not an ssvit checkpoint folder (no trainer_state.json).")
    return path


def _state(module) -> dict:
    return {k: v.contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, ema, run: RunConfig, keep: int) -> Path:
    final = output_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        (tmp / "config.yaml").write_text(run.dump())
        if ema is not None:
            save_file(_state(ema.module), tmp / "ema.safetensors")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints_in(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, model, ema, what: str) -> int:
    """Restore a checkpoint into the prepared model and optimizer (and the EMA); returns its step."""
    check_compatible(model.state_dict(), read_state_dict(path), str(path), what)
    accelerator.load_state(str(path))  # model, optimizer, every process's RNG states
    if ema is not None:
        ema.module.load_state_dict(load_file(path / "ema.safetensors"))
    return json.loads((path / "trainer_state.json").read_text())["step"]


def read_best(output_dir: Path) -> dict:
    path = output_dir / "best" / "best.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_best(accelerator: Accelerator, model, output_dir: Path, step: int, metrics: dict, run: RunConfig, best: dict) -> dict:
    """Keep the weights with the best validation `best_metric` in output_dir/best (safetensors + config.yaml)."""
    name = type(model).best_metric
    value = metrics.get(f"val/{name}")
    if name is None or value is None or value <= best.get("value", -math.inf):
        return best
    best = {"step": step, "metric": name, "value": value}
    if accelerator.is_main_process:
        tmp, final = output_dir / "best.tmp", output_dir / "best"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_state(model), tmp / "model.safetensors")
        (tmp / "config.yaml").write_text(run.dump())
        (tmp / "best.json").write_text(json.dumps(best) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return best
