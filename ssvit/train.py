"""The one training loop, on Accelerate, for every objective (pretraining and fine-tuning alike)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import load_file, save_file
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import objectives
from ssvit.config import RunConfig, TrainConfig
from ssvit.data import EpochSampler, load_splits
from ssvit.models import (
    check_compatible,
    create_backbone,
    describe,
    load_backbone_weights,
    read_state_dict,
    set_fused_attention,
)


class NonFiniteLossError(RuntimeError):
    pass


class JSONLTracker(GeneralTracker):
    """metrics.jsonl in the output folder: one JSON object per log call, readable without TensorBoard."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        # A run killed mid-write leaves a partial last line: drop it before a resumed run appends.
        if path.exists():
            text = path.read_text()
            if text and not text.endswith("\n"):
                path.write_text(text[: text.rfind("\n") + 1])

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        pass

    def log(self, values: dict, step: Optional[int] = None, **kwargs):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: checkpoints/step_XXXXXX, written to a temporary name and renamed, so a kill mid-save never
# destroys the previous one. accelerate.save_state writes model.safetensors, optimizer, RNG states.


def checkpoints_in(output_dir: Path) -> list[Path]:
    folder = output_dir / "checkpoints"
    found = [p for p in folder.glob("step_*") if p.is_dir() and p.name[5:].isdigit()] if folder.exists() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def resolve_resume(cfg: TrainConfig) -> Optional[Path]:
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
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "config.yaml").write_text(run.dump())
        (tmp / "best.json").write_text(json.dumps(best) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return best


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
            save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()}, tmp / "ema.safetensors")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints_in(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------------------------------------


def seed_process(seed: int) -> None:
    """Seed this process's RNGs for training: runs repeat from the seed, and each process draws its own
    corruption and augmentation noise (the seed is offset by the process index)."""
    set_seed(seed, device_specific=True)


def build_objective(run: RunConfig, num_classes: int) -> objectives.Objective:
    cfg = run.train
    backbone = create_backbone(cfg.model, cfg.img_size, cfg.model_kwargs)
    if cfg.init:
        if cfg.init.startswith("timm:"):
            import timm

            src = timm.create_model(cfg.init[5:], pretrained=True, num_classes=0)
            load_backbone_weights(backbone, src.state_dict(), cfg.init)
        else:
            load_backbone_weights(backbone, read_state_dict(cfg.init), cfg.init)
    return objectives.get(cfg.objective)(backbone, num_classes, run.objective_options)


def make_scheduler(optimizer, cfg: TrainConfig):
    """Linear warmup, then cosine or linear decay to zero at max_steps (timm's schedulers, stepped per update)."""
    warmup = min(cfg.warmup_steps, max(cfg.max_steps - 1, 0))
    kw = dict(t_initial=max(cfg.max_steps - warmup, 1), warmup_t=warmup, warmup_prefix=True, t_in_epochs=False)
    if cfg.lr_scheduler_type == "cosine":
        return CosineLRScheduler(optimizer, **kw)
    return PolyLRScheduler(optimizer, power=1.0 if cfg.lr_scheduler_type == "linear" else 0.0, **kw)


def make_optimizer(model: objectives.Objective, cfg: TrainConfig, lr: float, device_type: str = "cpu") -> torch.optim.Optimizer:
    """timm's parameter groups for the backbone (no weight decay on biases, norms, position embeddings and
    tokens; optional layer-wise lr decay), plus the objective's own parameters (head, [mask] token)."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    backbone = model.backbone
    skip = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else set()
    if cfg.layer_decay:
        groups = param_groups_layer_decay(backbone, cfg.weight_decay, skip, layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(backbone, cfg.weight_decay, no_weight_decay_list=skip)
    own = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    groups += [{"params": [p for p in own if p.ndim > 1], "weight_decay": cfg.weight_decay},
               {"params": [p for p in own if p.ndim <= 1], "weight_decay": 0.0}]  # fmt: skip
    groups = [g for g in groups if g["params"]]
    fused = cfg.fused_optimizer if cfg.fused_optimizer is not None else device_type == "cuda"
    kwargs = {"fused": True} if fused else {}  # not fused: PyTorch picks its foreach or per-parameter loop
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, **kwargs)
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), **kwargs)


@torch.no_grad()
def evaluate(accelerator, model, val_ds, cfg: TrainConfig, step: int, figures: Path, prefix: str = "") -> dict:
    """Objective metrics on the validation split, each process on its own shard (torchmetrics syncs)."""
    metrics = model.make_metrics().to(accelerator.device)
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = torch.utils.data.Subset(val_ds, range(rank, len(val_ds), world))
    loader = DataLoader(shard, batch_size=max(cfg.batch_size // world, 1), num_workers=cfg.dataloader_num_workers)
    was_training = model.training
    model.eval()
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    # A fixed seed for evaluation-time randomness (e.g. which patches are corrupted), so that evaluations
    # compare across steps and runs, and training's own RNG stream is left as it was.
    with torch.random.fork_rng(devices=devices), accelerator.autocast():
        torch.manual_seed(cfg.seed + 1)
        for i, batch in enumerate(loader):
            if cfg.eval_batches is not None and i >= cfg.eval_batches:
                break
            images = batch["image"].to(accelerator.device, non_blocking=True).float().div_(255)
            model.update_metrics(metrics, images, batch["label"].to(accelerator.device))
        result = {f"val/{prefix}{k}": float(v) for k, v in metrics.compute().items()}
        if accelerator.is_main_process and not prefix:
            first = torch.stack([val_ds[i]["image"] for i in range(min(16, len(val_ds)))])
            model.on_evaluate(first.to(accelerator.device).float().div_(255), None, figures, step)
    model.train(was_training)
    return result


def fewshot_during_training(accelerator, model, splits, cfg: TrainConfig) -> dict:
    """1/5/10/25-shot linear accuracy of the frozen backbone on the validation split (main process computes)."""
    from ssvit.evaluate import evaluate_backbone, representation_for

    result = {}
    if accelerator.is_main_process:
        was_training = model.training
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), accelerator.autocast():
            rep = representation_for(cfg.objective, cfg.fewshot_representation)
            out = evaluate_backbone(model.backbone, splits, rep, probe=False, max_train=2000, device=accelerator.device,
                                    batch_size=max(cfg.batch_size, 64))  # fmt: skip
        model.train(was_training)
        result = {f"val/{k}": v for k, v in out.items() if k.startswith("fewshot") and not k.endswith("_std")}
    accelerator.wait_for_everyone()
    return result


def train(run: RunConfig) -> dict:
    cfg = run.train
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        # Several processes on a machine without GPUs: accelerate needs cpu=True to form a gloo group, else
        # each process silently trains alone.
        cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=[*cfg.report_to, JSONLTracker(output_dir / "metrics.jsonl")],
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    world, accum = accelerator.num_processes, cfg.gradient_accumulation_steps
    if accelerator.device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 1) // local))
    if cfg.batch_size % (world * accum):
        raise ValueError(
            f"--batch_size {cfg.batch_size} is the global batch: it must divide evenly over {world} process(es) "
            f"x {accum} accumulation step(s). Use a multiple of {world * accum}."
        )
    micro_batch = cfg.batch_size // (world * accum)
    resume_from = resolve_resume(cfg)
    figures = output_dir / "figures"
    if accelerator.is_main_process:
        figures.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(run.dump())

    set_seed(cfg.seed)  # the same initial weights on every process
    with accelerator.main_process_first():
        splits = load_splits(cfg, is_main=accelerator.is_main_process)
    model = build_objective(run, splits.num_classes)
    set_fused_attention(model, cfg.fused_attn, accelerator.device.type, accelerator.mixed_precision)
    lr = cfg.lr * cfg.batch_size / cfg.lr_base_batch_size if cfg.lr_base_batch_size else cfg.lr
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    optimizer = make_optimizer(model, cfg, lr, accelerator.device.type)
    scheduler = make_scheduler(optimizer, cfg)
    train_ds = splits.train
    train_ds.seed = cfg.seed
    steps_per_epoch = len(train_ds) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch_size {cfg.batch_size} is larger than the training set ({len(train_ds)} images).")
    loader = DataLoader(
        train_ds,
        batch_size=micro_batch,
        sampler=EpochSampler(train_ds, cfg.seed, num_samples=steps_per_epoch * cfg.batch_size),
        drop_last=True,
        num_workers=cfg.dataloader_num_workers,
        # Its own generator: creating an iterator draws a seed, which must not come from the global RNG
        # (a resumed run creates its iterator at another point of the global RNG stream).
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if cfg.compile:
        model = torch.compile(model)
    unwrapped = accelerator.unwrap_model(model)
    ema = ModelEmaV3(unwrapped, decay=cfg.ema_decay) if cfg.ema_decay else None

    step = 0
    if resume_from is not None:
        check_compatible(unwrapped.state_dict(), read_state_dict(resume_from), str(resume_from), f"this {cfg.objective} run")
        accelerator.load_state(str(resume_from))  # model, optimizer, every process's RNG states
        step = json.loads((resume_from / "trainer_state.json").read_text())["step"]
        if ema is not None:
            ema.module.load_state_dict(load_file(resume_from / "ema.safetensors"))
        scheduler.step_update(step)
        accelerator.print(f"Resumed from {resume_from} at step {step}.")
    else:
        seed_process(cfg.seed)
    start_step = step

    flat_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(cfg).items()}
    accelerator.init_trackers("ssvit", config=flat_config)
    accelerator.print(
        f"{cfg.objective} | {cfg.model}: {describe(unwrapped.backbone)} | data {splits.description}\n"
        f"{world} process(es), global batch {cfg.batch_size} ({micro_batch} per process x {accum} accumulation), "
        f"lr {lr:.3g}, {cfg.max_steps} steps ({steps_per_epoch} per epoch), precision {accelerator.mixed_precision}"
    )

    first_bad = torch.full((), -1, device=accelerator.device)  # first step with a non-finite loss, kept on device
    last_checkpoint = resume_from

    def check_finite():
        bad = int(accelerator.reduce(first_bad.clone(), reduction="max"))
        if bad >= 0:
            raise NonFiniteLossError(
                f"The loss became non-finite (NaN/inf) at step {bad}. Training stopped; the last good checkpoint "
                f"is {last_checkpoint or 'none (no checkpoint was saved yet)'} and was left untouched. Lower --lr, "
                f"keep --max_grad_norm set, or use --mixed_precision bf16 instead of fp16; then --resume."
            )

    sums, count, data_wait, window_start = {}, 0, 0.0, time.perf_counter()
    total_wait, total_time, eval_result = 0.0, 0.0, {}
    best = json.loads((output_dir / "best/best.json").read_text()) if resume_from and (output_dir / "best/best.json").exists() else {}
    bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.objective, disable=not accelerator.is_local_main_process)
    model.train()
    while step < cfg.max_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        train_ds.set_epoch(epoch)
        batches = iter(accelerator.skip_first_batches(loader, offset * accum) if offset else loader)
        for _ in range((steps_per_epoch - offset) * accum):
            tick = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - tick
            images = batch["image"].float().div_(255).contiguous(memory_format=memory_format)
            # ---- the training step ----
            with accelerator.accumulate(model):  # prepare() already runs forward under autocast
                out = model(images, batch["label"])
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss = out.loss.detach()
            for k, v in {"loss": loss, **out.logs}.items():
                sums[k] = sums.get(k, 0.0) + v.float()
            count += 1
            first_bad = torch.where(~torch.isfinite(loss) & (first_bad < 0), step + 1, first_bad)
            if not accelerator.sync_gradients:
                continue
            step += 1
            scheduler.step_update(step)
            if ema is not None:
                ema.update(unwrapped, step=step)
            bar.update(1)
            # ---- logging, evaluation, checkpoints ----
            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                check_finite()
                elapsed = time.perf_counter() - window_start
                logs = {f"train/{k}": float(accelerator.reduce(v / count, reduction="mean")) for k, v in sums.items()}
                logs["train/lr"] = optimizer.param_groups[0]["lr"]
                logs["train/images_per_s"] = count / accum * cfg.batch_size / elapsed
                logs["train/data_wait_fraction"] = data_wait / elapsed
                accelerator.log(logs, step=step)
                bar.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{logs['train/lr']:.2e}", img_s=f"{logs['train/images_per_s']:.0f}")
                total_wait, total_time = total_wait + data_wait, total_time + elapsed
                sums, count, data_wait, window_start = {}, 0, 0.0, time.perf_counter()
            if step % cfg.eval_steps == 0 or step == cfg.max_steps:
                eval_result = evaluate(accelerator, unwrapped, splits.val, cfg, step, figures)
                if ema is not None:
                    eval_result |= evaluate(accelerator, ema.module, splits.val, cfg, step, figures, prefix="ema_")
                if cfg.fewshot_steps != 0 and (step == cfg.max_steps or (cfg.fewshot_steps and step % cfg.fewshot_steps == 0)):
                    eval_result |= fewshot_during_training(accelerator, unwrapped, splits, cfg)
                accelerator.log(eval_result, step=step)
                best = save_best(accelerator, unwrapped, output_dir, step, eval_result, run, best)
                bar.write(f"step {step}: " + ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in eval_result.items()))
                window_start = time.perf_counter()  # evaluation time is not training throughput
            if step % cfg.save_steps == 0 or step == cfg.max_steps:
                check_finite()  # never write a checkpoint with non-finite weights
                last_checkpoint = save_checkpoint(accelerator, output_dir, step, ema, run, cfg.save_total_limit)
                window_start = time.perf_counter()
            if step >= cfg.max_steps:
                break
    bar.close()
    checksum = torch.stack([p.detach().double().sum() for p in unwrapped.parameters()]).sum().reshape(1)
    checksums = accelerator.gather(checksum.to(accelerator.device)).tolist()
    accelerator.end_training()  # also ends the process group
    result = {
        "objective": cfg.objective,
        "model": cfg.model,
        "data": splits.description,
        "steps": step,
        "num_processes": world,
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "best": {**best, "path": str(output_dir / "best")} if best else None,
        "images_per_s": (step - start_step) * cfg.batch_size / total_time if total_time else None,
        "data_wait_fraction": total_wait / total_time if total_time else None,
        # One checksum of the weights per process: equal when the processes agree.
        "param_checksums": checksums,
        **eval_result,
    }
    if accelerator.is_main_process:
        (output_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
