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
    made = not output_dir.exists()
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
        if made and output_dir.is_dir() and not any(output_dir.iterdir()):  # a run refused before it wrote anything
            output_dir.rmdir()


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


RUN_FILES = ("config.yaml", "metrics.jsonl", "results.json", "best", "checkpoints", "figures", "logs")
"""What a run writes in its --output_dir (besides run.lock): a fresh run refuses a folder holding any of the first
five, and --overwrite_output_dir deletes all of them."""


def claim_folder(cfg: TrainConfig, resume_from: Optional[Path], is_main: bool) -> None:
    """A run writes only into a folder that holds nothing of another run (checked before anything is written):
    a fresh run into a used --output_dir is refused unless --overwrite_output_dir, and a resume from a checkpoint
    with later ones beside it (which it would replace) is refused."""
    output_dir = Path(cfg.output_dir)
    found = checkpoints_in(output_dir)
    if resume_from is not None:
        if resume_from.resolve().parent != (output_dir / "checkpoints").resolve():  # a branch into another folder
            if any((output_dir / name).exists() for name in RUN_FILES[:5]):
                raise UsageError(f"--output_dir {output_dir} holds another run: --resume {resume_from} continues into an "
                                 f"empty --output_dir (or into its own run folder, {resume_from.parent.parent}).")  # fmt: skip
            return
        step = int(resume_from.name[5:]) if resume_from.name[5:].isdigit() else -1
        later = [p for p in found if int(p.name[5:]) > step and not damaged(p)]
        if later:
            raise UsageError(f"--resume {resume_from}: later checkpoints of this run exist ({', '.join(p.name for p in later)}), "
                             f"and continuing from an earlier one would replace them. Resume the newest (a bare --resume), "
                             f"continue into another --output_dir (a new branch of the run), or move them aside.")  # fmt: skip
        return
    held = [name for name in RUN_FILES[:5] if (output_dir / name).exists() and (name != "checkpoints" or found)]
    if not held:
        return
    if cfg.resume == "auto" and not found and not (output_dir / "results.json").exists():
        return  # a study's run that stopped before its first checkpoint: it starts again
    what = ", ".join(held) + (f" up to {found[-1].name}" if found else "")
    if not cfg.overwrite_output_dir:
        raise UsageError(f"--output_dir {output_dir} holds another run ({what}). Continue it with --resume, choose "
                         f"another --output_dir, or pass --overwrite_output_dir to replace it.")  # fmt: skip
    if is_main:
        print(f"--overwrite_output_dir: replacing the run in {output_dir} ({what}).")
        for name in RUN_FILES:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


# Options that do not change what a run trains: a resume may change them and still repeat an uninterrupted run.
RESUME_FREE = {"output_dir", "resume", "overwrite_output_dir", "allow_inexact_resume", "init", "logging_steps", "evals",
               "eval_steps", "eval_batches", "fewshot_steps", "fewshot_representation", "save_steps", "save_total_limit",
               "report_to", "cpu_threads", "dataloader_num_workers", "compile", "fused_attn", "fused_optimizer",
               "channels_last"}  # fmt: skip


def resume_changes(path: Path, run: RunConfig, world: int) -> list[str]:
    """What would make a resume from `path` differ from the uninterrupted run: the settings that decide what is
    trained, the number of processes, and RNG states the checkpoint lacks."""
    import yaml

    cfg, changes = run.train, []
    if (path / "config.yaml").exists():
        from ssvit import objectives
        from ssvit.config import upgrade

        saved, now = upgrade(yaml.safe_load((path / "config.yaml").read_text())), yaml.safe_load(run.dump())

        ignored = RESUME_FREE | (set(objectives.OBJECTIVES) - {cfg.objective, cfg.aux})
        changes += [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(saved.keys() | now.keys())
                    if k not in ignored and saved.get(k) != now.get(k)]  # fmt: skip
    states = sorted(path.glob("random_states_*.pkl"))
    if len(states) > world:
        changes.append(f"{len(states)} processes wrote it, this run has {world}")
    missing = [f"random_states_{i}.pkl" for i in range(world) if not (path / f"random_states_{i}.pkl").exists()]
    if missing:
        changes.append(f"{', '.join(missing)} (the RNG state of corruption, dropout and augmentation) is missing")
    return changes


def check_resume(path: Path, run: RunConfig, world: int) -> None:
    """A resume continues exactly, or is refused by name; --allow_inexact_resume continues and says so."""
    problem = damaged(path)
    if problem:
        intact = next((p for p in reversed(checkpoints_in(path.parent.parent)) if p != path and not damaged(p)), None)
        raise UsageError(f"--resume: {problem}. The newest intact checkpoint is "
                         f"{f'{intact}: --resume {intact}' if intact else 'none: start the run again'}.")  # fmt: skip
    changes = resume_changes(path, run, world)
    if not changes:
        return
    if not run.train.allow_inexact_resume:
        raise UsageError(f"--resume {path}: {'; '.join(changes)}. The run would not continue exactly. Resume with the "
                         f"checkpoint's settings (its config.yaml), or pass --allow_inexact_resume to go on anyway.")  # fmt: skip
    print(f"--allow_inexact_resume: resuming {path} with {'; '.join(changes)}. The run is no longer exact (it does not "
          f"repeat an uninterrupted run); its config.yaml records the flag.")  # fmt: skip


def damaged(path: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be resumed from (a file missing or cut short: a kill mid-copy, a full disk
    outside ssvit), or None. The sizes written are in trainer_state.json; older checkpoints have their weights
    file checked."""
    from ssvit.models import safetensors_problem

    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"{path}/trainer_state.json is damaged or missing ({type(e).__name__})"
    for name, size in state.get("files", {}).items():
        f = path / name
        if not f.exists():
            return f"{f} is damaged: missing"
        if f.stat().st_size != size:
            return f"{f} is damaged: {f.stat().st_size:,} bytes, {size:,} were written"
    if "files" not in state and (path / "model.safetensors").exists():
        problem = safetensors_problem(path / "model.safetensors")
        return f"{path / 'model.safetensors'} is damaged: {problem[1]}" if problem else None
    return None


def finished_results(path: Optional[Path], cfg: TrainConfig) -> Optional[dict]:
    """The results of the run a --resume names when it has already finished (its checkpoint is at --max_steps and
    results.json is its), else None."""
    if path is None:
        return None
    step = json.loads((path / "trainer_state.json").read_text())["step"]
    results = Path(cfg.output_dir) / "results.json"
    if step < cfg.max_steps or not results.exists():
        return None
    saved = json.loads(results.read_text())
    return saved if saved.get("steps") == step else None


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
        accelerator.wait_for_everyone()  # every process's RNG state is written
        if accelerator.is_main_process:
            (tmp / "config.yaml").write_text(run.dump())
            if ema is not None:
                save_file(_state(ema.module), tmp / "ema.safetensors")
            # The size of every file, written last: a resume tells a checkpoint cut short from a whole one (damaged).
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "stream": stream, "files": files}))
    if accelerator.is_main_process:
        if final.exists():  # this run's own checkpoint of this step (claim_folder refuses to replace another's)
            shutil.rmtree(final)
        os.replace(tmp, final)
        # Rotation keeps `keep` checkpoints with this one and removes only older ones: none later than it is touched.
        older = [p for p in checkpoints_in(output_dir) if int(p.name[5:]) < step]
        for old in older[: max(len(older) - (keep - 1), 0)]:
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
    try:
        accelerator.load_state(str(path))  # model, optimizer, every process's RNG states
    except Exception as e:  # noqa: BLE001 - a checkpoint older than the size manifest, damaged in a file it reads
        raise UsageError(f"--resume: {path} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}): a "
                         f"file in it is damaged. Resume from an earlier checkpoint with --resume PATH.") from e  # fmt: skip
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
