"""The one training loop, on Accelerate, for every objective (pretraining and fine-tuning alike).

    setup()       Accelerator, data, model, optimizer, scheduler, loaders; resume
    train_step()  forward, backward, clipping, optimizer step (ssvit.bench times this same function)
    loop()        steps, logging, evaluators (ssvit/evals.py), checkpoints (ssvit/checkpoints.py)
    finish()      results.json
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration, gather_object, send_to_device, set_seed
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ssvit import objectives
from ssvit.objectives.base import Progress, StepOutput
from ssvit.checkpoints import (
    check_resume,
    check_stream_plan,
    checkpoints_in,
    claim_folder,
    finished_results,
    hold_folder,
    load_checkpoint,
    read_best,
    resolve_resume,
    save_best,
    save_checkpoint,
    trim_metrics,
)
from ssvit.config import RunConfig, TrainConfig, check_paths
from ssvit.data import EpochSampler, Splits, load_splits
from ssvit.errors import CollapseError, Interrupted, NonFiniteLossError, PeerLostError, UsageError
from ssvit import evals
from ssvit.evals import EVALUATORS
from ssvit.models import create_backbone, describe, load_init, set_fused_attention
from ssvit.stream import StreamingImages, streaming_splits


class JSONLTracker(GeneralTracker):
    """metrics.jsonl in the output folder: one JSON object per log call, readable without TensorBoard."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: Path):
        super().__init__()
        self.path = path  # trimmed to the step the run starts from by setup() (checkpoints.trim_metrics)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        pass

    def log(self, values: dict, step: Optional[int] = None, **kwargs):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def seed_process(seed: int) -> None:
    """Seed this process's RNGs for training: runs repeat from the seed, and each process draws its own
    corruption and augmentation noise (the seed is offset by the process index)."""
    set_seed(seed, device_specific=True)


def build_objective(run: RunConfig, num_classes: int) -> objectives.Objective:
    cfg = run.train
    regularised = {"drop_path_rate": cfg.drop_path_rate} if cfg.drop_path_rate is not None else {}
    objective_cls = run.objective_class
    needs = objective_cls.backbone_kwargs(cfg, run.objective_options)
    backbone = create_backbone(cfg.model, cfg.img_size, {**(cfg.model_kwargs or {}), **regularised, **needs})
    objective = objective_cls(backbone, num_classes, run.objective_options)
    if cfg.init:  # after the objective: what it initialises in the backbone (MAE's fixed positions) must not win
        objective.on_init(load_init(objective.backbone, cfg.init, cfg.init_checkpoint_key))
    if cfg.freeze_backbone:  # no gradient, so no optimizer state nor weight decay (timm's groups skip it)
        objective.backbone.requires_grad_(False)
    return objective


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


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX). Without, PyTorch emulates
    bf16 and a bf16 matmul runs ~600x slower than fp32 (measured on an AVX2-only AMD EPYC: 0.0003 vs 0.17 TFLOP/s)."""
    # PyTorch has no public query for bf16 matrix units: torch.backends.cpu.get_cpu_capability() names the vector ISA
    # ("AVX512" with or without AVX512-BF16), so this asks the two private checks torch.cpu itself keeps.
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_precision(cfg: TrainConfig) -> Optional[str]:
    """bf16 autocast is a speed choice on CPUs: where the CPU has no bf16 units it would make training hundreds
    of times slower, so ssvit trains in fp32 there and says so."""
    if cfg.mixed_precision == "bf16" and not torch.cuda.is_available() and not cpu_has_bf16():
        print("This CPU has no bf16 matrix units (AVX512-BF16 or AMX): bf16 autocast would run hundreds of times "
              "slower than fp32 here, so this run trains in fp32 (--mixed_precision no silences this message).")  # fmt: skip
        return "no"
    return cfg.mixed_precision


def gloo_on_cpu() -> bool:
    """Several processes on a machine without GPUs: accelerate needs cpu=True to form a gloo group, else each process
    silently trains alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def process_state() -> PartialState:
    """This process's place in the launch (its device, whether it is the main process), the group formed as the
    runs' Accelerator forms it: for work between runs, such as a study's frozen-feature evaluations."""
    return PartialState(cpu=gloo_on_cpu())


@functools.cache
def end_process_group_at_exit() -> None:
    """The process group lives as long as the command: several runs (a study) train in it one after another."""
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def make_accelerator(cfg: TrainConfig, trackers: list) -> Accelerator:
    for engine in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true" and not torch.cuda.is_available():
            # Accelerate (1.15) sets up FSDP and DeepSpeed for accelerator devices only; on CPU processes it
            # silently trains with DDP instead (distributed type MULTI_CPU, every parameter replicated).
            raise UsageError(f"accelerate launch --use_{engine.lower()} needs GPUs: on CPU, Accelerate would train with "
                             f"plain data parallelism instead, without saying so. Launch without --use_{engine.lower()} "
                             f"(--multi_gpu) on CPU.")  # fmt: skip
    accelerator = Accelerator(
        cpu=gloo_on_cpu(),
        mixed_precision=resolve_precision(cfg),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")),
    )
    if accelerator.num_processes > 1:
        end_process_group_at_exit()
    if accelerator.device.type == "cpu":
        share_cores(cfg.cpu_threads, accelerator.num_processes)
    return accelerator


def share_cores(cpu_threads: Optional[int] = None, processes: int = 1) -> None:
    """torch threads for this process: cpu_threads, else the machine's cores shared by the processes on it.
    accelerate launch sets OMP_NUM_THREADS=1, which would leave all but one core idle."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    torch.set_num_threads(cpu_threads or max(1, (os.cpu_count() or 1) // local))


@dataclass(kw_only=True)
class Trainer:
    """What one optimizer step needs and changes. The loop's State is a Trainer with data; ssvit.bench builds a bare
    one, so that what it times is the loop's own step (train_step), hooks and all."""

    run: RunConfig
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared (DDP-wrapped with several processes)
    unwrapped: objectives.Objective
    optimizer: torch.optim.Optimizer
    scheduler: object
    steps_per_epoch: int
    ema: Optional[ModelEmaV3] = None
    step: int = 0
    """Optimizer steps done."""

    @property
    def cfg(self) -> TrainConfig:
        return self.run.train

    def progress(self) -> Progress:
        return Progress(self.step, self.cfg.max_steps, self.steps_per_epoch, self.optimizer)


def inputs(batch: dict) -> tuple:
    """The objective's forward arguments from a batch: images and labels, and the unlabeled views when the objective
    draws a second stream (Objective.unlabeled)."""
    return (batch["image"], batch["label"], batch["unlabeled"]) if "unlabeled" in batch else (batch["image"], batch["label"])


def example_batch(run: RunConfig, n: int, num_classes: int = 10) -> dict:
    """A batch of n random images in [0, 1] shaped as the run's objective trains on them (a batch of each of its views,
    and its unlabeled stream's), with random labels: what FLOPs are counted on (ssvit.compare) and steps timed on
    (ssvit.bench) before any data is read."""
    cfg, objective_cls = run.train, run.objective_class
    views = objective_cls.views(cfg, run.objective_options)
    batch = {"image": views.example(n) if views else torch.rand(n, 3, cfg.img_size, cfg.img_size),
             "label": torch.randint(0, num_classes, (n,))}  # fmt: skip
    if (second := objective_cls.unlabeled(cfg, run.objective_options)) is not None:
        batch["unlabeled"] = second.views.example(second.ratio * n)
    return batch


def train_step(trainer: Trainer, batch: dict, mark: Callable[[str], None] = lambda phase: None) -> StepOutput:
    """One micro-step, the only one in ssvit: forward (under the autocast prepare() installed), backward, the
    objective's on_train_step; when the gradients are synchronised, clipping, on_before_optimizer_step, the optimizer
    step, the scheduler, on_optimizer_step and the EMA. `mark` is called after each phase (the benchmark times them)."""
    accelerator, objective, cfg = trainer.accelerator, trainer.unwrapped, trainer.cfg
    with accelerator.accumulate(trainer.model):
        out = trainer.model(*inputs(batch))
        mark("forward")
        accelerator.backward(out.loss)
        mark("backward")
        if accelerator.sync_gradients:
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(trainer.model.parameters(), cfg.max_grad_norm)
            objective.on_before_optimizer_step(trainer.progress())
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    objective.on_train_step(out)
    if accelerator.sync_gradients:
        trainer.step += 1
        trainer.scheduler.step_update(trainer.step)
        objective.on_optimizer_step(trainer.progress())
        if trainer.ema is not None:
            trainer.ema.update(objective, step=trainer.step)
    mark("optimizer")
    return out


# ----------------------------------------------------------------------------------------------------------
# The loop's state, and its three parts


@dataclass(kw_only=True)
class State(Trainer):
    """The loop's state: the Trainer, its data, and what the loop keeps over steps."""

    splits: Splits
    loader: DataLoader
    sampler: EpochSampler | StreamingImages  # the train order: set_epoch / set_position
    unlabeled_loader: Optional[DataLoader] = None
    """With an objective that draws unlabeled images (Objective.unlabeled): the second stream, over all training images."""
    unlabeled_sampler: Optional[EpochSampler] = None
    unlabeled_steps_per_epoch: int = 0
    val_loader: DataLoader
    test_loader: Optional[DataLoader]
    start_step: int = 0
    last_checkpoint: Optional[Path] = None
    best: dict = field(default_factory=dict)
    eval_result: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    wait_seconds: float = 0.0
    images_seen: int = 0  # by this process, since this invocation started (a resumed run counts from its resume)
    row_groups_read: set = field(default_factory=set)  # with --streaming, by this process since this invocation started

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)


def setup(run: RunConfig, accelerator: Accelerator, resume_from: Optional[Path] = None) -> State:
    """Everything the loop needs. Nothing in the run folder changes until the run is known to start (data
    loaded, model built, a --resume checkpoint found compatible); then config.yaml is written."""
    cfg, output_dir = run.train, Path(run.train.output_dir)
    world, accum = accelerator.num_processes, cfg.gradient_accumulation_steps
    set_seed(cfg.seed)  # the same initial weights on every process
    micro_batch = cfg.batch_size // (world * accum)
    objective_cls = run.objective_class
    views = objective_cls.views(cfg, run.objective_options)  # None: one crop at --img_size
    second = objective_cls.unlabeled(cfg, run.objective_options)  # None: one stream, the labelled images
    if second is not None and cfg.streaming:
        raise UsageError(f"--objective {cfg.objective} draws a second, unlabeled stream of images, which --streaming does "
                         f"not provide yet: train without --streaming (the images are cached once at --img_size).")  # fmt: skip
    with accelerator.main_process_first():
        if cfg.streaming:
            splits = streaming_splits(cfg, accelerator.process_index, world, micro_batch, views)
        else:
            splits = load_splits(cfg, is_main=accelerator.is_main_process, views=views,
                                 unlabeled_views=second.views if second else None)  # fmt: skip
    if objective_cls.needs_labels and not splits.num_classes:
        raise UsageError(f"--objective {cfg.objective} needs labels, and {cfg.data} has none (no label column, or "
                         f"images not in class folders). Use a self-supervised objective such as masked_patch, or name "
                         f"the labels with --label_column.")  # fmt: skip
    model = build_objective(run, splits.num_classes)
    set_fused_attention(model, cfg.fused_attn, accelerator.device.type, accelerator.mixed_precision)
    model.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    lr = cfg.lr * cfg.batch_size / cfg.lr_base_batch_size if cfg.lr_base_batch_size else cfg.lr
    optimizer = make_optimizer(model, cfg, lr, accelerator.device.type)
    workers = loader_workers(cfg, splits)
    held_out = [DataLoader(s, batch_size=max(cfg.batch_size // world, 1), **workers) for s in (splits.val, splits.test) if s is not None]
    # The loader's own generator: creating an iterator draws a seed, which must not come from the global RNG (a
    # resumed run creates its iterator at another point of the global RNG stream).
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.streaming:  # each process reads its own part of the stream: not prepared (Accelerate would dispatch or re-split it)
        splits.train.set_workers(workers["num_workers"])
        loader = DataLoader(splits.train, batch_size=micro_batch, generator=generator, **workers)
        sampler = splits.train
        # Every process must take the same number of steps per epoch: the smallest.
        steps_per_epoch = int(accelerator.reduce(torch.tensor([len(sampler) // micro_batch // accum], device=accelerator.device), "min"))
    else:
        steps_per_epoch = len(splits.train) // cfg.batch_size
        sampler = EpochSampler(len(splits.train), cfg.seed, num_samples=steps_per_epoch * cfg.batch_size)
        loader = DataLoader(splits.train, batch_size=micro_batch, sampler=sampler, drop_last=True, generator=generator, **workers)
    if steps_per_epoch == 0:
        n = len(splits.train)
        subset = next((f"--{k} {v}" for k in ("label_fraction", "samples_per_class") if (v := getattr(cfg, k)) is not None), None)
        if subset:  # the user knows the whole training set's size, not the subset's
            raise UsageError(f"--batch_size {cfg.batch_size} is larger than the labelled training set: {n} images at {subset}. "
                             f"Lower --batch_size to {n} or less, or raise {subset.split()[0]}.")  # fmt: skip
        raise UsageError(f"--batch_size {cfg.batch_size} is larger than the training set ({n} images). Lower --batch_size to {n} or less.")
    unlabeled = {}
    if second is not None:  # the second stream: all training images, its own seeded order, second.ratio x the batch
        size = second.ratio * cfg.batch_size
        unlabeled_steps = len(splits.unlabeled) // size
        if unlabeled_steps == 0:
            raise UsageError(f"{second.ratio} x --batch_size {cfg.batch_size} unlabeled images per step is more than the "
                             f"{len(splits.unlabeled):,} training images: lower --batch_size or the ratio.")  # fmt: skip
        unlabeled_sampler = EpochSampler(len(splits.unlabeled), cfg.seed + 1, num_samples=unlabeled_steps * size)
        unlabeled_loader = DataLoader(splits.unlabeled, batch_size=second.ratio * micro_batch, sampler=unlabeled_sampler,
                                      drop_last=True, generator=torch.Generator().manual_seed(cfg.seed + 1), **workers)  # fmt: skip
        unlabeled = dict(unlabeled_loader=accelerator.prepare(unlabeled_loader), unlabeled_sampler=unlabeled_sampler,
                         unlabeled_steps_per_epoch=unlabeled_steps)  # fmt: skip
    if resume_from is None:  # on the device, before prepare (whose wrapper hands every process the main process's
        model.to(accelerator.device)  # weights) and before the EMA copy: what the objective sets here is where it starts
        model.on_train_start(splits.train)
    model, optimizer, val_loader, *test_loader = accelerator.prepare(model, optimizer, *held_out)
    if not cfg.streaming:
        loader = accelerator.prepare(loader)
    if cfg.compile:
        model = torch.compile(model)
    unwrapped = accelerator.unwrap_model(model)
    ema = ModelEmaV3(unwrapped, decay=cfg.ema_decay) if cfg.ema_decay else None
    state = State(run=run, accelerator=accelerator, model=model, unwrapped=unwrapped, optimizer=optimizer,
                  scheduler=make_scheduler(optimizer, cfg), steps_per_epoch=steps_per_epoch, ema=ema, splits=splits,
                  loader=loader, sampler=sampler, val_loader=val_loader, test_loader=(test_loader or [None])[0],
                  last_checkpoint=resume_from, **unlabeled)  # fmt: skip
    if resume_from is not None:
        if not cfg.allow_inexact_resume:
            check_stream_plan(resume_from, stream_plan(state))
        state.step = state.start_step = load_checkpoint(accelerator, resume_from, unwrapped, ema, f"this {cfg.objective} run")
        state.scheduler.step_update(state.step)
        state.best = read_best(output_dir)
        accelerator.print(f"Resumed from {resume_from} at step {state.step}.")
    else:
        seed_process(cfg.seed)
    if accelerator.is_main_process:  # the run starts: now its folder may change
        (output_dir / "figures").mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(run.dump())
        trim_metrics(output_dir / "metrics.jsonl", state.step)
    flat_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(cfg).items()}
    accelerator.init_trackers("ssvit", config=flat_config)
    accelerator.print(
        f"{cfg.objective} | {cfg.model}: {describe(unwrapped.backbone)} | data {splits.description}\n"
        f"{world} process(es), global batch {cfg.batch_size} ({micro_batch} per process x {accum} accumulation), "
        f"lr {lr:.3g}, {cfg.max_steps} steps ({steps_per_epoch} per epoch), precision {accelerator.mixed_precision}"
    )
    return state


def stream_plan(state: State) -> Optional[dict]:
    return state.sampler.plan() if isinstance(state.sampler, StreamingImages) else None


def _worker_signals(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C (SIGINT, sent to the terminal's whole process group) to the training process,
    which finishes its step and checkpoints. On SIGTERM (a scheduler's, or the loader ending them) a worker exits
    with status 0: torch would raise "worker killed by signal" in the training process, in the middle of its
    checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def loader_workers(cfg: TrainConfig, splits: Splits) -> dict:
    """DataLoader worker settings: --dataloader_num_workers, or one for cached data (it only crops and flips, off
    the training thread: the loop waited 2% of its time for it in the main process, docs/performance.md) and the
    cores shared by the local processes otherwise. Workers are safe for exact resume: an item's augmentation is
    seeded by its (epoch, index) key, not by a worker's RNG."""
    from ssvit.data import TensorImages, collate

    n = cfg.dataloader_num_workers
    if n is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        n = 1 if isinstance(splits.train, TensorImages) else max(1, (os.cpu_count() or 1) // local)
    settings = {"num_workers": n, "collate_fn": collate}
    if n:
        settings.update(persistent_workers=True, prefetch_factor=4, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=_worker_signals)  # fmt: skip
    return settings


class Window:
    """Sums of the logged values over a logging window, with its wall-clock and data-wait time, and the first step
    whose loss was not finite (kept on the device: read only at logging and saving steps, no sync per step)."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, device=device)
        self.reset()

    def reset(self) -> None:
        self.sums, self.count, self.data_wait, self.start = {}, 0, 0.0, time.perf_counter()

    def add(self, values: dict[str, torch.Tensor], step: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.float()
        self.count += 1
        self.first_bad = torch.where(~torch.isfinite(values["loss"]) & (self.first_bad < 0), step, self.first_bad)

    def check_finite(self, state: "State") -> None:
        bad = int(state.accelerator.reduce(self.first_bad.clone(), reduction="max"))
        if bad >= 0:
            raise NonFiniteLossError(
                f"The loss became non-finite (NaN/inf) at step {bad}. Training stopped; the last good checkpoint "
                f"is {state.last_checkpoint or 'none (no checkpoint was saved yet)'} and was left untouched. Lower --lr, "
                f"keep --max_grad_norm set, or use --mixed_precision bf16 instead of fp16; then --resume."
            )


def log_window(state: State, window: Window) -> dict:
    cfg, accelerator = state.cfg, state.accelerator
    elapsed = time.perf_counter() - window.start
    logs = {f"train/{k}": float(accelerator.reduce(v / window.count, reduction="mean")) for k, v in window.sums.items()}
    logs["train/lr"] = state.optimizer.param_groups[0]["lr"]
    logs["train/images_per_s"] = window.count / cfg.gradient_accumulation_steps * cfg.batch_size / elapsed
    logs["train/data_wait_fraction"] = window.data_wait / elapsed
    accelerator.log(logs, step=state.step)
    state.train_seconds, state.wait_seconds = state.train_seconds + elapsed, state.wait_seconds + window.data_wait
    window.reset()
    return logs


def evaluate(state: State) -> bool:
    """Every evaluator in --evals that is due at this step; the best checkpoint follows validation."""
    result = {}
    for name in state.cfg.evals:
        evaluator, due = EVALUATORS[name]
        if due(state.cfg, state.step):
            result |= evaluator(state, state.step)
    if result:
        state.eval_result = result
        state.accelerator.log(result, step=state.step)
        state.best = save_best(state.accelerator, state.unwrapped, state.output_dir, state.step, result, state.run, state.best)
        tqdm.write(f"step {state.step}: " + ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in result.items()))
    return bool(result)


@torch.no_grad()
def check_savable(state: State, batch: dict) -> None:
    """Before a checkpoint is written: the weights and optimizer state are finite, and the weights give a
    finite loss on the last batch (an optimizer step can ruin the weights before any loss shows it)."""
    accelerator, model = state.accelerator, state.unwrapped
    tensors = [*model.parameters(), *(v for s in state.optimizer.state.values() for v in s.values()
                                     if torch.is_tensor(v) and v.is_floating_point())]  # fmt: skip
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        finite &= torch.isfinite(model(*inputs(batch)).loss)  # forked RNG: training's stream is unchanged
    if not int(accelerator.reduce(finite.float().reshape(1), reduction="sum")) == accelerator.num_processes:
        raise NonFiniteLossError(
            f"The weights or optimizer state became non-finite (NaN/inf) by step {state.step}: it was not saved. The last "
            f"good checkpoint is {state.last_checkpoint or 'none (no checkpoint was saved yet)'} and was left untouched. "
            f"Lower --lr, keep --max_grad_norm set, or use --mixed_precision bf16 instead of fp16; then --resume."
        )


class StopSignals:
    """SIGTERM (what SLURM and Kubernetes send before they kill) and SIGINT (Ctrl-C) ask the loop to stop after the
    current step with a checkpoint; a second one ends the process at once. Installed for the length of a run."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[int] = None
        self.previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, frame) -> None:
        if self.received is not None:  # the second: at once, as if no handler were installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: finishing the current step and writing a checkpoint "
              f"(send it again to stop at once).", file=sys.stderr, flush=True)  # fmt: skip

    def requested(self, accelerator: Accelerator, step: int, every: int) -> Optional[int]:
        """The signal received, or None. One process checks after every step; several share what any of them received
        every `every` steps (the logging steps, where the loop already waits for the device), so that all stop at the
        same step without an all-reduce and a device sync in every step."""
        if accelerator.num_processes == 1:
            return self.received
        if step % every:
            return None
        received = accelerator.reduce(torch.tensor([self.received or 0], device=accelerator.device), reduction="max")
        return int(received) or None


def resume_command(state: State) -> str:
    """The command that continues this run: its own command (the name it was parsed under) with the run's config.yaml
    and --resume, under accelerate launch when several processes train; for a run another command started (a study),
    that command again (its finished runs are kept, this one resumes)."""
    command = (state.run.command or "").removeprefix("ssvit-")
    launch = f"accelerate launch ssvit/{command}.py" if state.accelerator.num_processes > 1 else f"ssvit {command}"
    config = state.output_dir / "config.yaml"
    if command == "pretrain":
        return f"{launch} --config {config} --resume"
    if command == "finetune":  # finetune takes its architecture from --init before it reads the config
        return f"{launch} --init {state.cfg.init} --config {config} --resume"
    return "the same command again (this run resumes from its checkpoint)"


def stop_here(state: State, signum: int, batch: Optional[dict]) -> None:
    """Checkpoint the step just finished (unless it was just written) and raise Interrupted with the way back."""
    name = signal.Signals(signum).name
    if state.step == state.start_step:
        if state.start_step == 0 and state.accelerator.is_main_process:  # what setup wrote, so that the same command runs
            (state.output_dir / "config.yaml").unlink(missing_ok=True)
            metrics = state.output_dir / "metrics.jsonl"
            if metrics.exists() and not metrics.read_text().strip():
                metrics.unlink()
        raise Interrupted(f"stopped by {name} before the first step: nothing was trained. Run the same command again.", signum)
    latest = state.output_dir / "checkpoints" / f"step_{state.step:06d}"
    if state.last_checkpoint != latest:
        check_savable(state, batch)
        state.last_checkpoint = save_checkpoint(state.accelerator, state.output_dir, state.step, state.ema, state.run,
                                                state.cfg.save_total_limit, stream_plan(state))  # fmt: skip
    raise Interrupted(f"stopped by {name} at step {state.step}: checkpoint {state.last_checkpoint}. Resume with: "
                      f"{resume_command(state)}", signum)  # fmt: skip


def loop(state: State, stop: Optional[StopSignals] = None) -> None:
    """Steps until --max_steps: a batch, train_step, then after_step (log, evaluate, save, stop on a signal)."""
    cfg, accelerator = state.cfg, state.accelerator
    stop = stop or StopSignals()
    window, batch = Window(accelerator.device), None
    with tqdm(total=cfg.max_steps, initial=state.step, desc=cfg.objective, disable=not accelerator.is_local_main_process) as bar:
        state.model.train()
        if state.step < cfg.max_steps and (signum := stop.requested(accelerator, 0, 1)):
            stop_here(state, signum, batch)
        data = batches(state)
        while state.step < cfg.max_steps:
            tick = time.perf_counter()
            try:
                batch = next(data)
            except RuntimeError:  # a loader worker ended by the same SIGTERM: the last step is checkpointed instead
                if stop.received is None:
                    raise
                stop_here(state, stop.received, batch)
            window.data_wait += time.perf_counter() - tick
            state.images_seen += len(batch["label"])
            number = state.step + 1  # the optimizer step this micro-step belongs to
            out = train_step(state, batch)
            window.add({"loss": out.loss.detach(), **out.logs}, number)
            if accelerator.sync_gradients:
                bar.update(1)
                after_step(state, window, batch, stop, bar)


def after_step(state: State, window: "Window", batch: dict, stop: "StopSignals", bar) -> None:
    """Everything that follows an optimizer step, in order: the logging window (with the finite-loss and health
    checks), the evaluators due, a checkpoint when due, and a stop on a signal."""
    cfg, accelerator = state.cfg, state.accelerator
    last = state.step == cfg.max_steps
    if state.step % cfg.logging_steps == 0 or last:
        window.check_finite(state)
        logs = log_window(state, window)
        if problem := state.unwrapped.health({k.removeprefix("train/"): v for k, v in logs.items()}):
            raise CollapseError(f"{problem} at step {state.step}. Training stopped; the last good checkpoint "
                                f"is {state.last_checkpoint or 'none (no checkpoint was saved yet)'}.")  # fmt: skip
        bar.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{logs['train/lr']:.2e}", img_s=f"{logs['train/images_per_s']:.0f}")
    paused = evaluate(state)
    if state.step % cfg.save_steps == 0 or last:
        window.check_finite(state)
        check_savable(state, batch)  # never write a checkpoint with non-finite weights
        state.last_checkpoint = save_checkpoint(accelerator, state.output_dir, state.step, state.ema, state.run,
                                                cfg.save_total_limit, stream_plan(state))  # fmt: skip
        paused = True
    if paused:
        window.start = time.perf_counter()  # evaluation and checkpoint time is not training throughput
    if not last and (signum := stop.requested(accelerator, state.step, cfg.logging_steps)):
        stop_here(state, signum, batch)


def batches(state: State):
    """Every micro-batch from the current step to the end of training, on the device with images as [0, 1] floats,
    and, for an objective that draws them, a batch of unlabeled views beside each (batch["unlabeled"]). Epochs,
    streaming and the resume position of both streams are handled here and nowhere else: where each stream stands is
    a function of the step alone, so a resumed run sees exactly what the uninterrupted run saw."""
    memory_format = torch.channels_last if state.cfg.channels_last else torch.contiguous_format
    labelled = epochs(state, state.sampler, state.loader, state.steps_per_epoch)
    unlabeled = None
    if state.unlabeled_loader is not None:
        unlabeled = epochs(state, state.unlabeled_sampler, state.unlabeled_loader, state.unlabeled_steps_per_epoch)
    for batch in labelled:
        batch["image"] = to_float(batch["image"], memory_format)
        if unlabeled is not None:
            batch["unlabeled"] = to_float(next(unlabeled)["image"], memory_format)
        yield batch


def epochs(state: State, sampler, loader: DataLoader, steps_per_epoch: int):
    """One stream's micro-batches from the current step on, epoch after epoch (each a seeded order: set_epoch, or the
    stream's set_position), the current epoch's first steps skipped."""
    accum = state.cfg.gradient_accumulation_steps
    epoch, offset = divmod(state.step, steps_per_epoch)
    while True:
        if isinstance(sampler, StreamingImages):  # the stream fast-forwards itself, without reading what it skips
            sampler.set_position(epoch, offset * accum)
            micro_batches = streamed(state)
        else:
            sampler.set_epoch(epoch)
            micro_batches = state.accelerator.skip_first_batches(loader, offset * accum) if offset else loader
        # Streamed, a process may hold more batches than the epoch's steps (the smallest share of every process).
        yield from itertools.islice(micro_batches, (steps_per_epoch - offset) * accum)
        epoch, offset = epoch + 1, 0


def to_float(images: torch.Tensor | list, memory_format) -> torch.Tensor | list:
    """A uint8 batch (or a list of them, one per view) as the model takes it: [0, 1] floats."""
    if isinstance(images, list):
        return [to_float(v, memory_format) for v in images]
    return images.float().div_(255).contiguous(memory_format=memory_format)


def streamed(state: State):
    """The streaming loader's batches on the device, noting the row groups they came from (results.json)."""
    for batch in state.loader:
        state.row_groups_read.update(state.sampler.groups.of(batch.pop("row").numpy()).tolist())
        yield send_to_device(batch, state.accelerator.device, non_blocking=True)


def finish(state: State) -> dict:
    """Gather a checksum of the weights from every process, close the trackers, write results.json."""
    cfg, accelerator = state.cfg, state.accelerator
    test = evals.test(state)
    if test:
        accelerator.log(test, step=state.step)
    checksum = torch.stack([p.detach().double().sum() for p in state.unwrapped.parameters()]).sum().reshape(1)
    checksums = accelerator.gather(checksum.to(accelerator.device)).tolist()
    images_seen = accelerator.gather(torch.tensor([state.images_seen], device=accelerator.device)).tolist()
    row_groups = gather_object([sorted(state.row_groups_read)]) if cfg.streaming else None
    for tracker in accelerator.trackers:  # not end_training(): a study (ssvit compare) trains run after run in this group
        tracker.finish()
    result = {
        "objective": cfg.objective,
        "model": cfg.model,
        "data": state.splits.description,
        "steps": state.step,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "checkpoint": str(state.last_checkpoint) if state.last_checkpoint else None,
        "best": {**state.best, "path": str(state.output_dir / "best")} if state.best else None,
        "images_per_s": (state.step - state.start_step) * cfg.batch_size / state.train_seconds if state.train_seconds else None,
        "data_wait_fraction": state.wait_seconds / state.train_seconds if state.train_seconds else None,
        # One checksum of the weights per process: equal when the processes agree.
        "param_checksums": checksums,
        # Images each process trained on in this invocation: the global batch split over processes.
        "images_per_process": images_seen,
        # With --streaming: the row groups (in the order of the shards' files) each process trained on.
        **({"streamed_row_groups": row_groups} if cfg.streaming else {}),
        **state.eval_result,
        **test,
    }
    if accelerator.is_main_process:
        (state.output_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def train(run: RunConfig) -> dict:
    cfg = run.train
    check_paths(cfg)
    output_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, [*cfg.report_to, JSONLTracker(output_dir / "metrics.jsonl")])
    world, accum = accelerator.num_processes, cfg.gradient_accumulation_steps
    if cfg.batch_size % (world * accum):
        raise UsageError(
            f"--batch_size {cfg.batch_size} is the global batch: it must divide evenly over {world} process(es) "
            f"x {accum} accumulation step(s). Use a multiple of {world * accum}."
        )
    with StopSignals() as stop, hold_folder(output_dir, accelerator.is_main_process), peers_watched(accelerator, output_dir):
        accelerator.wait_for_everyone()
        # What the folder holds decides whether this run may start, before anything is read or written.
        resume_from = resolve_resume(cfg)
        if resume_from is not None:
            check_resume(resume_from, run, world)
        claim_folder(cfg, resume_from, accelerator.is_main_process)
        done = finished_results(resume_from, cfg)
        if done is not None:
            accelerator.print(f"The run in {output_dir} already finished at step {done['steps']} (--max_steps "
                              f"{cfg.max_steps}): nothing to train, results.json is unchanged.")  # fmt: skip
            return done
        accelerator.wait_for_everyone()
        state = setup(run, accelerator, resume_from)
        if state.step >= cfg.max_steps:  # its last checkpoint was written, its results were not: evaluate it again
            evaluate(state)
        loop(state, stop)
        return finish(state)


# How torch.distributed reports a peer that is gone: gloo's "Connection closed by peer", a reset, or a timeout. There
# is no public type for it: gloo raises a plain RuntimeError (only some paths raise torch.distributed.DistError), so
# the message is what tells (with DistError alone, the two-host test's surviving host printed a traceback).
PEER_LOST = ("closed by peer", "reset by peer", "Broken pipe", "Connection refused", "Timed out", "timed out")


@contextmanager
def peers_watched(accelerator: Accelerator, output_dir: Path):
    """With several processes, a peer that dies (its host crashed, it was killed) surfaces here as a collective
    that fails: say that plainly, with the way back, instead of a backend traceback."""
    try:
        yield
    except RuntimeError as e:
        if accelerator.num_processes == 1 or not (isinstance(e, dist.DistError) or any(s in str(e) for s in PEER_LOST)):
            raise
        last = next(reversed(checkpoints_in(output_dir)), None)
        raise PeerLostError(
            f"another process of this run stopped, so this one (rank {accelerator.process_index}) cannot go on: "
            f"{str(e).splitlines()[0][:300]}. Check that process's log (or its machine). Then start the run again on "
            f"every machine with --resume ({f'from {last}' if last else 'no checkpoint was written yet'})."
        ) from e


def print_summary(result: dict, output_dir: str) -> None:
    """What a run left behind and the commands that take it further (pretrain.py and finetune.py print it)."""
    metrics = {k.removeprefix("val/"): v for k, v in result.items() if k.startswith("val/")}
    print("\nValidation:", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    ckpt = result["checkpoint"]
    print(f"Checkpoint: {ckpt}")
    figures = ", figures/" if any((Path(output_dir) / "figures").glob("*.png")) else ""  # not every objective draws one
    print(f"Results:    {output_dir}/results.json, metrics.jsonl{figures}")
    print("Next:")
    print(f"  fine-tune: ssvit finetune --init {ckpt}")
    print(f"  evaluate:  ssvit evaluate --init {ckpt}")
    print(f"  export:    ssvit export {ckpt} --out {output_dir}/exported")
    print(f"  figures:   ssvit figures {ckpt} --out {output_dir}/inspect")
