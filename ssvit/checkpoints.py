"""Checkpoints: writing, rotation, the best one, and loading for --resume.

A checkpoint is ``checkpoints/step_NNNNNN/``: ``accelerator.save_state`` (model.safetensors, optimizer, every
process's RNG state) plus ``trainer_state.json``, ``config.yaml`` and ``ema.safetensors``. It is written under
``step_NNNNNN.tmp`` and renamed, so a kill mid-save never destroys the previous checkpoint. (Accelerate's
``automatic_checkpoint_naming`` writes in place, without that guarantee, so it is not used.)
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from ssvit.config import RunConfig, TrainConfig
from ssvit.errors import UsageError
from ssvit.models import check_compatible, read_state_dict


# ----------------------------------------------------------------------------------------------------------
# The run folder belongs to one run at a time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def hold_folder(output_dir: Path, is_main: bool, flag: str = "--output_dir"):
    """Hold output_dir for this run: output_dir/run.lock names the owner's pid and host. A second run into the
    folder is refused; a lock left by a dead process of this host is taken over, with a message."""
    lock = output_dir / "run.lock"
    if not is_main:
        yield
        return
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _attempt in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                owner = json.loads(lock.read_text() or "{}")
                if owner.get("host") != me["host"] or _alive(owner.get("pid", -1)):
                    raise UsageError(
                        f"{flag} {output_dir} is in use by another run (pid {owner.get('pid')} on {owner.get('host')}, "
                        f"started {owner.get('started')}). Choose another {flag}, or wait for that run to end "
                        f"(if it is gone for sure, delete {lock})."
                    ) from None
                print(f"Taking over {output_dir}: the run that held it (pid {owner.get('pid')}) is no longer running.")
                lock.unlink(missing_ok=True)
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
    except OSError as e:
        raise UsageError(f"{flag} {output_dir} cannot be written ({e.strerror or e}): choose a folder you can write to.") from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def trim_metrics(path: Path, step: int) -> None:
    """Keep the lines of metrics.jsonl up to `step`, where a resumed run continues (a fresh run: step 0), and
    drop a line cut by a kill mid-write: every step is then logged once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    path.write_text("".join(kept))


@contextmanager
def _written(tmp: Path, what: str, kept: Optional[Path]):
    """Writing a checkpoint into `tmp`: on a full disk (or any failed write) remove the partial folder and say
    so, keeping the previous checkpoint."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in str(e) or shutil.disk_usage(tmp.parent).free < 2**20
        if not full:
            raise
        raise UsageError(
            f"The disk is full: writing {what} to {tmp.parent} failed ({e}). The partial {tmp.name} was removed; the "
            f"previous checkpoint {kept or '(none)'} is kept. Free some space (or lower --save_total_limit), then --resume."
        ) from None


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


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, ema, run: RunConfig, keep: int,
                    stream: Optional[dict] = None) -> Path:  # fmt: skip
    final = output_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with _written(tmp, f"checkpoint step {step}", (checkpoints_in(output_dir) or [None])[-1]):
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "stream": stream}))
            (tmp / "config.yaml").write_text(run.dump())
            if ema is not None:
                save_file(_state(ema.module), tmp / "ema.safetensors")
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints_in(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _reading(plan: Optional[dict]) -> str:
    if plan is None:
        return "map-style data (no --streaming)"
    return (f"--streaming over {plan['processes']} process(es) x {plan['loader_workers']} DataLoader worker(s), "
            f"micro-batches of {plan['micro_batch']}, --shuffle_buffer {plan['shuffle_buffer']}")  # fmt: skip


def check_stream_plan(path: Path, stream: Optional[dict]) -> None:
    """A streamed epoch's order is planned for its processes, loader workers, micro-batch and shuffle buffer
    (ssvit/stream.py): a resume with others would not see the images the interrupted run had left."""
    saved = json.loads((path / "trainer_state.json").read_text())
    if "stream" not in saved or saved["stream"] == stream:  # checkpoints before this check carry no plan
        return
    raise UsageError(f"--resume {path}: the checkpoint was written by a run reading {_reading(saved['stream'])}; this "
                     f"run reads {_reading(stream)}. The order of the images depends on them: resume with the same (the number "
                     f"of processes, --dataloader_num_workers, --batch_size and --gradient_accumulation_steps, "
                     f"--shuffle_buffer), or start a new run in another --output_dir.")  # fmt: skip


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
        with _written(tmp, "the best weights", final if final.exists() else None):
            tmp.mkdir(parents=True)
            save_file(_state(model), tmp / "model.safetensors")
            (tmp / "config.yaml").write_text(run.dump())
            (tmp / "best.json").write_text(json.dumps(best) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return best
