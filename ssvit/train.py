"""The one training loop, on Accelerate, for every objective (pretraining and fine-tuning alike).

    setup()       Accelerator, data, model, optimizer, scheduler, loaders; resume
    train_step()  forward, backward, clipping, optimizer step (ssvit.bench times this same function)
    loop()        steps, logging, evaluators (ssvit/evals.py), checkpoints (ssvit/checkpoints.py)
    finish()      results.json
"""

from __future__ import annotations

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
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration, gather_object, send_to_device, set_seed
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ssvit import objectives
from ssvit.objectives.base import Progress
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
    objective_cls = objectives.get(cfg.objective)
    needs = objective_cls.backbone_kwargs(cfg, run.objective_options)
    backbone = create_backbone(cfg.model, cfg.img_size, {**(cfg.model_kwargs or {}), **regularised, **needs})
    objective = objective_cls(backbone, num_classes, run.objective_options)
    if cfg.init:  # after the objective: what it initialises in the backbone (MAE's fixed positions) must not win
        load_init(objective.backbone, cfg.init, student=cfg.init_student)
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


def make_accelerator(cfg: TrainConfig, trackers: list) -> Accelerator:
    for engine in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true" and not torch.cuda.is_available():
            # Accelerate (1.15) sets up FSDP and DeepSpeed for accelerator devices only; on CPU processes it
            # silently trains with DDP instead (distributed type MULTI_CPU, every parameter replicated).
            raise UsageError(f"accelerate launch --use_{engine.lower()} needs GPUs: on CPU, Accelerate would train with "
                             f"plain data parallelism instead, without saying so. Launch without --use_{engine.lower()} "
                             f"(--multi_gpu) on CPU.")  # fmt: skip
    accelerator = Accelerator(
        # Several processes on a machine without GPUs: accelerate needs cpu=True to form a gloo group, else
        # each process silently trains alone.
        cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
        mixed_precision=resolve_precision(cfg),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")),
    )
    if accelerator.device.type == "cpu":
        share_cores(cfg.cpu_threads, accelerator.num_processes)
    return accelerator


def share_cores(cpu_threads: Optional[int] = None, processes: int = 1) -> None:
    """torch threads for this process: cpu_threads, else the machine's cores shared by the processes on it.
    accelerate launch sets OMP_NUM_THREADS=1, which would leave all but one core idle."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    torch.set_num_threads(cpu_threads or max(1, (os.cpu_count() or 1) // local))


def train_step(accelerator: Accelerator, model, optimizer, images: torch.Tensor, labels: torch.Tensor,
               max_grad_norm: Optional[float], mark: Callable[[str], None] = lambda phase: None,
               before_step: Optional[Callable[[], None]] = None):  # fmt: skip
    """One micro-step: forward (under the autocast prepare() installed), backward, and, when the gradients are
    synchronised, clipping, `before_step` (the objective's on_before_optimizer_step) and the optimizer step. `mark` is
    called after each phase (the benchmark times them)."""
    with accelerator.accumulate(model):
        out = model(images, labels)
        mark("forward")
        accelerator.backward(out.loss)
        mark("backward")
        if accelerator.sync_gradients and max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        if accelerator.sync_gradients and before_step is not None:
            before_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("optimizer")
    return out


# ----------------------------------------------------------------------------------------------------------
# The loop's state, and its three parts


@dataclass
class State:
    run: RunConfig
    accelerator: Accelerator
    splits: Splits
    model: torch.nn.Module  # as prepared (DDP-wrapped with several processes)
    unwrapped: objectives.Objective
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: DataLoader
    sampler: EpochSampler | StreamingImages  # the train order: set_epoch / set_position
    steps_per_epoch: int
    val_loader: DataLoader
    test_loader: Optional[DataLoader]
    ema: Optional[ModelEmaV3]
    step: int = 0
    start_step: int = 0
    last_checkpoint: Optional[Path] = None
    best: dict = field(default_factory=dict)
    eval_result: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    wait_seconds: float = 0.0
    images_seen: int = 0  # by this process, since this invocation started (a resumed run counts from its resume)
    row_groups_read: set = field(default_factory=set)  # with --streaming, by this process since this invocation started

    @property
    def cfg(self) -> TrainConfig:
        return self.run.train

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
    views = objectives.get(cfg.objective).views(cfg, run.objective_options)  # None: one crop at --img_size
    with accelerator.main_process_first():
        if cfg.streaming:
            splits = streaming_splits(cfg, accelerator.process_index, world, micro_batch, views)
        else:
            splits = load_splits(cfg, is_main=accelerator.is_main_process, views=views)
    if objectives.get(cfg.objective).needs_labels and not splits.num_classes:
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
        raise UsageError(f"--batch_size {cfg.batch_size} is larger than the training set ({len(splits.train)} images).")
    model, optimizer, val_loader, *test_loader = accelerator.prepare(model, optimizer, *held_out)
    if not cfg.streaming:
        loader = accelerator.prepare(loader)
    if cfg.compile:
        model = torch.compile(model)
    unwrapped = accelerator.unwrap_model(model)
    ema = ModelEmaV3(unwrapped, decay=cfg.ema_decay) if cfg.ema_decay else None
    state = State(run, accelerator, splits, model, unwrapped, optimizer, make_scheduler(optimizer, cfg), loader, sampler,
                  steps_per_epoch, val_loader, (test_loader or [None])[0], ema, last_checkpoint=resume_from)  # fmt: skip
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
    """Sums of the logged values over a logging window, with its wall-clock and data-wait time."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums, self.count, self.data_wait, self.start = {}, 0, 0.0, time.perf_counter()

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.float()
        self.count += 1


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
def check_savable(state: State, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Before a checkpoint is written: the weights and optimizer state are finite, and the weights give a
    finite loss on the last batch (an optimizer step can ruin the weights before any loss shows it)."""
    accelerator, model = state.accelerator, state.unwrapped
    tensors = [*model.parameters(), *(v for s in state.optimizer.state.values() for v in s.values()
                                     if torch.is_tensor(v) and v.is_floating_point())]  # fmt: skip
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        finite &= torch.isfinite(model(images, labels).loss)  # forked RNG: training's stream is unchanged
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
    """The command that continues this run: pretrain.py or finetune.py with the run's config.yaml and --resume; for
    a run started by another command (a study), that command again (its finished runs are kept, this one resumes)."""
    argv0 = Path(sys.argv[0])
    script = sys.argv[1] if argv0.stem == "ssvit" and len(sys.argv) > 1 else argv0.stem.removeprefix("ssvit-")
    launch = f"accelerate launch ssvit/{script}.py" if argv0.suffix == ".py" else f"ssvit {script}"
    config = state.output_dir / "config.yaml"
    if script == "pretrain":
        return f"{launch} --config {config} --resume"
    if script == "finetune":  # finetune.py takes its architecture from --init before it reads the config
        return f"{launch} --init {state.cfg.init} --config {config} --resume"
    return "the same command again (this run resumes from its checkpoint)"


def stop_here(state: State, signum: int, images: Optional[torch.Tensor], labels: Optional[torch.Tensor]) -> None:
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
        check_savable(state, images, labels)
        state.last_checkpoint = save_checkpoint(state.accelerator, state.output_dir, state.step, state.ema, state.run,
                                                state.cfg.save_total_limit, stream_plan(state))  # fmt: skip
    raise Interrupted(f"stopped by {name} at step {state.step}: checkpoint {state.last_checkpoint}. Resume with: "
                      f"{resume_command(state)}", signum)  # fmt: skip


def loop(state: State, stop: Optional[StopSignals] = None) -> None:
    cfg, accelerator, accum = state.cfg, state.accelerator, state.cfg.gradient_accumulation_steps
    stop = stop or StopSignals()
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    first_bad = torch.full((), -1, device=accelerator.device)  # first step with a non-finite loss, kept on device

    def check_finite():
        bad = int(accelerator.reduce(first_bad.clone(), reduction="max"))
        if bad >= 0:
            raise NonFiniteLossError(
                f"The loss became non-finite (NaN/inf) at step {bad}. Training stopped; the last good checkpoint "
                f"is {state.last_checkpoint or 'none (no checkpoint was saved yet)'} and was left untouched. Lower --lr, "
                f"keep --max_grad_norm set, or use --mixed_precision bf16 instead of fp16; then --resume."
            )

    with tqdm(total=cfg.max_steps, initial=state.step, desc=cfg.objective, disable=not accelerator.is_local_main_process) as bar:
        state.model.train()
        window, images, labels = Window(), None, None
        if state.step < cfg.max_steps and (signum := stop.requested(accelerator, 0, 1)):
            stop_here(state, signum, images, labels)
        while state.step < cfg.max_steps:
            epoch, offset = divmod(state.step, state.steps_per_epoch)
            if cfg.streaming:  # the stream fast-forwards itself, without reading what it skips
                state.sampler.set_position(epoch, offset * accum)
                batches = streamed(state)
            else:
                state.sampler.set_epoch(epoch)
                batches = iter(accelerator.skip_first_batches(state.loader, offset * accum) if offset else state.loader)
            for _ in range((state.steps_per_epoch - offset) * accum):
                tick = time.perf_counter()
                try:
                    batch = next(batches)
                except RuntimeError:  # a loader worker ended by the same SIGTERM: the last step is checkpointed instead
                    if stop.received is None:
                        raise
                    stop_here(state, stop.received, images, labels)
                window.data_wait += time.perf_counter() - tick
                state.images_seen += len(batch["image"])
                images, labels = batch["image"], batch["label"]
                images = [to_float(v, memory_format) for v in images] if isinstance(images, list) else to_float(images, memory_format)
                before = lambda: state.unwrapped.on_before_optimizer_step(progress(state, state.step))  # noqa: E731
                out = train_step(accelerator, state.model, state.optimizer, images, labels, cfg.max_grad_norm, before_step=before)
                state.unwrapped.on_train_step(out)
                loss = out.loss.detach()
                window.add({"loss": loss, **out.logs})
                first_bad = torch.where(~torch.isfinite(loss) & (first_bad < 0), state.step + 1, first_bad)
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                state.scheduler.step_update(state.step)
                state.unwrapped.on_optimizer_step(progress(state, state.step))
                if state.ema is not None:
                    state.ema.update(state.unwrapped, step=state.step)
                bar.update(1)
                last = state.step == cfg.max_steps
                if state.step % cfg.logging_steps == 0 or last:
                    check_finite()
                    logs = log_window(state, window)
                    if problem := state.unwrapped.health({k.removeprefix("train/"): v for k, v in logs.items()}):
                        raise CollapseError(f"{problem} at step {state.step}. Training stopped; the last good checkpoint "
                                            f"is {state.last_checkpoint or 'none (no checkpoint was saved yet)'}.")  # fmt: skip
                    bar.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{logs['train/lr']:.2e}", img_s=f"{logs['train/images_per_s']:.0f}")
                paused = evaluate(state)
                if state.step % cfg.save_steps == 0 or last:
                    check_finite()
                    check_savable(state, images, labels)  # never write a checkpoint with non-finite weights
                    state.last_checkpoint = save_checkpoint(accelerator, state.output_dir, state.step, state.ema, state.run,
                                                            cfg.save_total_limit, stream_plan(state))  # fmt: skip
                    paused = True
                if paused:
                    window.start = time.perf_counter()  # evaluation and checkpoint time is not training throughput
                if last:
                    break
                if signum := stop.requested(accelerator, state.step, cfg.logging_steps):
                    stop_here(state, signum, images, labels)


def progress(state: State, step: int) -> Progress:
    return Progress(step, state.cfg.max_steps, state.steps_per_epoch, state.optimizer)


def to_float(images: torch.Tensor, memory_format) -> torch.Tensor:
    """A uint8 batch as the model takes it: [0, 1] floats."""
    return images.float().div_(255).contiguous(memory_format=memory_format)


def streamed(state: State):
    """The streaming loader's batches on the device, noting the row groups they came from (results.json)."""
    for batch in state.loader:
        state.row_groups_read.update(state.sampler.groups.of(batch.pop("row").numpy()).tolist())
        yield send_to_device(batch, state.accelerator.device, non_blocking=True)


def finish(state: State) -> dict:
    """Gather a checksum of the weights from every process, end the process group, write results.json."""
    cfg, accelerator = state.cfg, state.accelerator
    test = evals.test(state)
    if test:
        accelerator.log(test, step=state.step)
    checksum = torch.stack([p.detach().double().sum() for p in state.unwrapped.parameters()]).sum().reshape(1)
    checksums = accelerator.gather(checksum.to(accelerator.device)).tolist()
    images_seen = accelerator.gather(torch.tensor([state.images_seen], device=accelerator.device)).tolist()
    row_groups = gather_object([sorted(state.row_groups_read)]) if cfg.streaming else None
    accelerator.end_training()  # also ends the process group
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
