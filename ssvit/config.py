"""Run configuration: one typed dataclass, YAML presets in configs/, every key overridable on the command line.

Parsing is jsonargparse's: unknown keys and wrong types are errors that name the valid keys, and the resolved
config is written next to every run (``config.yaml``) so ``--config runs/x/config.yaml`` repeats it.
Objective-specific options live with their objective (``objectives/<name>.py``, class ``Options``) and are
addressed as ``--masked_patch.mask_ratio 0.15`` or, in YAML, ``masked_patch: {mask_ratio: 0.15}``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from jsonargparse import ArgumentParser, Namespace

from ssvit import objectives
from ssvit.cli import make_parser, normalize, parse_args, preset_dir
from ssvit.data import DataSource
from ssvit.models import init_architecture, pooling_for, read_state_dict, saved_config
from ssvit.errors import UsageError, range_problems

DEFAULT_MODEL_KWARGS = {"vit_tiny_patch16_224": {"patch_size": 4, "depth": 6}}
"""model_kwargs of the default model when none are given: the quick start's ViT-Ti/4 with 6 blocks at 32 px."""


@dataclass
class TrainConfig:
    """Configuration of one training run (pretraining or fine-tuning: the same loop)."""

    objective: str = "masked_patch"
    """Training objective, a name registered in objectives/ (masked_patch, supervised, ...)."""
    aux: Optional[str] = None
    """Joint training: a self-supervised objective (e.g. mae) trained in the same steps on every training image, its
    loss added to --objective's with --aux_weight; its options are its own (--mae.mask_ratio, ...)."""
    aux_weight: float = 1.0
    """Weight of the --aux objective's loss."""
    aux_ratio: int = 1
    """Images of the --aux stream per labelled image in a step."""
    model: str = "vit_tiny_patch16_224"
    """Any timm model name: vit_*, resnetv2_*_bit, hybrid vit_*_r50_* ..."""
    model_kwargs: Optional[dict] = None
    """Keyword overrides for timm.create_model, e.g. {patch_size: 4, depth: 6}. Unset: the quick start's ViT-Ti/4
    with 6 blocks ({patch_size: 4, depth: 6}) for the default --model, nothing ({}) for any other model."""
    img_size: int = 32
    """Training resolution in pixels (square)."""
    drop_path_rate: Optional[float] = None
    """Stochastic depth (timm's drop_path_rate), e.g. 0.1 for MAE fine-tuning; unset: the model's default (none)."""
    init: Optional[str] = None
    """Start from weights: an ssvit checkpoint (dir or model.safetensors), an exported backbone folder,
    or timm:<name> for timm's pretrained weights. The objective's head is always new."""

    init_checkpoint_key: Optional[str] = None
    """With --init an ssvit checkpoint: start from this backbone of it (e.g. backbone: DINO's student; momentum_backbone:
    MoCo v3's momentum encoder; teacher.backbone: FixMatch's EMA teacher); unset: the one its objective releases (DINO's
    teacher, MoCo v3's base encoder)."""

    data: str = "synthetic"
    """synthetic[:N] | parquet:PATH | imagefolder:DIR | a Hugging Face hub dataset name (needs internet)."""
    image_column: Optional[str] = None
    """Image column; detected from the dataset features when unset."""
    label_column: Optional[str] = None
    """Label column; detected (a ClassLabel feature) when unset."""
    val_fraction: float = 0.02
    """Share of train held out for validation when the data has no validation split (ViT paper: 2%)."""
    test_fraction: Optional[float] = None
    """Share of train held out as a test split when the data has none (after validation, disjoint from it): the
    split a study reports, never used for a choice. Evaluated once at the end of a run (results.json: test/*)."""
    split_seed: int = 0
    """Seed of the held-out validation split: keep it fixed across runs so that they compare."""
    label_fraction: Optional[float] = None
    """Train on a class-balanced fraction of the training images, drawn with --seed (low-label studies)."""
    samples_per_class: Optional[int] = None
    """Train on N images per class, drawn with --seed (few-label studies)."""
    crop_scale: tuple[float, float] = (0.35, 1.0)
    """RandomResizedCrop area range (the paper's augmentation: random resized crop + flip)."""
    hflip: bool = True
    """Random horizontal flips."""
    streaming: bool = False
    """Read --data parquet:PATH as a stream of row groups, never copied, converted or cached: each process reads a
    disjoint part, through a shuffle buffer, in an order that is a function of (seed, epoch, position), so that
    --resume continues exactly (ssvit/stream.py). Validation and test rows are read where they lie."""
    shuffle_buffer: int = 1000
    """With --streaming: images in each loader worker's shuffle buffer (Hugging Face datasets' default size)."""
    dataloader_num_workers: Optional[int] = None
    """DataLoader worker processes. Unset: one for data in the uint8 cache (it only crops and flips), else the
    machine's cores divided among the local processes (persistent, prefetching; pinned memory on CUDA)."""

    output_dir: str = "runs/latest"
    """Where checkpoints, logs, config.yaml and figures go. A folder that holds another run is refused (continue it
    with --resume, or replace it with --overwrite_output_dir)."""
    overwrite_output_dir: bool = False
    """Start a new run in an --output_dir that holds another one, deleting that run's checkpoints, best weights,
    metrics, results and figures first (Hugging Face Trainer's flag)."""
    max_steps: int = 300
    """Optimizer steps to train for."""
    batch_size: int = 128
    """Global batch size: split over processes and gradient accumulation steps."""
    gradient_accumulation_steps: int = 1
    lr: float = 2e-3
    """Peak learning rate (at lr_base_batch_size when that is set)."""
    lr_base_batch_size: Optional[int] = None
    """When set, lr is scaled linearly: lr * batch_size / lr_base_batch_size."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.1
    """AdamW default is the paper's pretraining value (0.1); fine-tuning uses 0."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    momentum: float = 0.9
    """SGD momentum (paper fine-tuning: 0.9)."""
    layer_decay: Optional[float] = None
    """Layer-wise lr decay for fine-tuning (timm's, e.g. 0.75: each block down gets 0.75x the lr)."""
    freeze_backbone: bool = False
    """Train the objective's own parameters only (with --objective supervised and --init: a linear probe); the
    backbone keeps the weights it started with."""
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 20
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm (paper: 1); null disables."""
    ema_decay: Optional[float] = None
    """Keep an exponential moving average of the weights (timm ModelEmaV3), e.g. 0.9999."""
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = "bf16"
    """Autocast precision (bf16 is ~1.7x faster than fp32 on CPUs with bf16 units); null takes accelerate launch's."""
    seed: int = 0
    resume: Optional[str] = None
    """Resume: 'latest' (the newest checkpoint in output_dir; a bare --resume means this) or a checkpoint path."""
    allow_inexact_resume: bool = False
    """Resume even when the settings that decide what is trained (data, batch, schedule, model, objective options,
    processes) differ from the checkpoint's, or its RNG states are missing: the run then no longer repeats an
    uninterrupted one, and its config.yaml records this flag."""

    logging_steps: int = 10
    evals: list[str] = field(default_factory=lambda: ["val", "fewshot"])
    """Evaluators the loop runs (ssvit/evals.py): val (the objective's validation metrics and figure), fewshot."""
    eval_steps: int = 100
    """Evaluate on the validation split every N steps and at the end."""
    eval_batches: Optional[int] = None
    """Cap on validation batches per evaluation (None: the whole split)."""
    fewshot_steps: Optional[int] = None
    """Few-shot linear accuracy (paper section 4.1) on the validation split every N steps; None: at the end only;
    0: never. The paper chose its masked-patch design by this metric."""
    fewshot_representation: Literal["auto", "cls", "mean", "prelogits"] = "auto"
    """Frozen features for few-shot: auto = the objective's own (the mean patch token for the masked-image objectives,
    whose class token gets no loss), pre-logits otherwise."""
    save_steps: int = 100
    save_total_limit: int = 2
    """How many step checkpoints to keep (oldest removed first)."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Accelerate trackers besides the always-on metrics.jsonl (e.g. [tensorboard, wandb]; [] for none)."""
    cpu_threads: Optional[int] = None
    """Torch threads per process on CPU. Unset: the machine's cores shared by the local processes (accelerate
    launch sets OMP_NUM_THREADS=1, which would leave all but one core idle)."""
    fused_attn: Optional[bool] = None
    """PyTorch fused attention in timm's blocks; null: fused, except on CPU under bf16 (its backward is slow there)."""
    compile: bool = False
    """torch.compile the model."""
    fused_optimizer: Optional[bool] = None
    """PyTorch's fused AdamW/SGD (one kernel over all parameters); null: fused on CUDA, PyTorch's default elsewhere."""
    channels_last: bool = False
    """Model and images in channels_last memory format: faster convolutions (BiT, hybrid stems) on GPUs."""


def _bare_switches(argv: list[str]) -> list[str]:
    """Accept a bare --resume for --resume latest, and a bare switch such as --streaming or --compile for --streaming
    true."""
    switches = {f"--{f.name}" for f in dataclasses.fields(TrainConfig) if f.type in ("bool", "Optional[bool]")}
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in ("--resume", *switches) and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("latest" if arg == "--resume" else "true")
    return out


def build_parser(defaults: Optional[dict] = None, prog: Optional[str] = None) -> ArgumentParser:
    parser = make_parser(prog or "ssvit-pretrain", __doc__, config=True)
    parser.add_class_arguments(TrainConfig, fail_untyped=True, sub_configs=True)
    for name, objective in objectives.OBJECTIVES.items():
        parser.add_class_arguments(objective.Options, nested_key=name, help=f"Options of the {name} objective.")
    if defaults:
        parser.set_defaults(defaults)
    return parser


@dataclass
class RunConfig:
    """A parsed run: the trainer's config, the chosen objective's options, and the parser to dump both."""

    train: TrainConfig
    objective_options: object
    namespace: Namespace
    parser: ArgumentParser
    command: Optional[str] = None
    """The command that parsed it (ssvit-pretrain, ssvit-finetune); None for a run started by another (a study)."""
    aux_options: object = None
    """With --aux: that objective's options."""

    @functools.cached_property
    def objective_class(self) -> type:
        """The class that trains this run: --objective's, or with --aux the two trained jointly (objectives.base.joint)."""
        main = objectives.get(self.train.objective)
        if not self.train.aux:
            return main
        from ssvit.objectives.base import joint

        cfg = self.train
        return joint(main, objectives.get(cfg.aux), cfg, self.aux_options, cfg.aux_weight, cfg.aux_ratio)

    def dump(self) -> str:
        # Keep nulls (they differ from defaults); never --overwrite_output_dir: `--config runs/x/config.yaml`
        # repeats a run, and must not delete the very run it repeats.
        return self.parser.dump(self.namespace.clone().update(False, "overwrite_output_dir"), skip_unset=False)


def _known_keys() -> dict[str, set]:
    """The keys a config file may hold: TrainConfig's fields, and each objective's options under its name."""
    keys = {f.name: set() for f in dataclasses.fields(TrainConfig)}
    return keys | {name: {f.name for f in dataclasses.fields(o.Options)} for name, o in objectives.OBJECTIVES.items()}


def _unknown(key: str, known, path: str) -> UsageError:
    import difflib

    close = difflib.get_close_matches(key.rpartition(".")[2], list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return UsageError(f"--config {path}: unknown key {key!r}{hint}. `--help` lists the options.")


RENAMED = {"init_student": ("init_checkpoint_key", lambda student: "backbone" if student else None)}
"""Keys of older runs' config.yaml, with their new name and value: --config and --resume read such runs as they were."""


def upgrade(values: dict) -> dict:
    """A saved config with the keys RENAMED under their new names."""
    values = dict(values)
    for old, (new, convert) in RENAMED.items():
        if old in values:
            values.setdefault(new, convert(values.pop(old)))
    return values


def check_config_file(path: str) -> Optional[dict]:
    """A --config file is readable YAML whose keys are options: refused naming the file, line and key (the parser's
    own messages name '<unicode string>' and print its 50-line usage first). Returns the file's values under today's
    names if it has RENAMED keys (an older run's config.yaml), else None."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file{' (a folder)' if p.is_dir() else ''}. Give a preset's name such as "
                         f"cifar10_mpp_cpu, or a YAML file such as a run's config.yaml.")  # fmt: skip
    try:
        values = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "context_mark", None) or getattr(e, "problem_mark", None)
        what = ", ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise UsageError(f"--config {path}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}: {what}.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot be read ({e}).") from None
    if values is None:
        return
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected `option: value` lines, found a {type(values).__name__}.")
    upgraded = upgrade(values)
    known = _known_keys()
    for key, value in upgraded.items():
        if key not in known:
            raise _unknown(str(key), known, path)
        if known[key] and isinstance(value, dict):
            for sub in value:
                if sub not in known[key]:
                    raise _unknown(f"{key}.{sub}", known[key], path)
    return upgraded if upgraded != values else None



def parse(argv: Optional[list[str]] = None, defaults: Optional[dict] = None, prog: Optional[str] = None) -> RunConfig:
    argv = _bare_switches(normalize(sys.argv[1:] if argv is None else list(argv)))
    with tempfile.TemporaryDirectory(prefix="ssvit-config-") as upgraded:
        for i, arg in enumerate(argv):
            if arg == "--config" and i + 1 < len(argv) or arg.startswith("--config="):
                path = arg.partition("=")[2] or argv[i + 1]
                values = check_config_file(path)
                if values is not None:  # an older run's config.yaml: read under today's names, the file left alone
                    copy = Path(upgraded) / f"{i}_{Path(path).name}"
                    copy.write_text(yaml.safe_dump(values, sort_keys=False))
                    argv[i if "=" in arg else i + 1] = f"--config={copy}" if "=" in arg else str(copy)
        parser = build_parser(defaults, prog)
        ns = parse_args(parser, argv)
    if ns.model_kwargs is None:  # defaults that belong to one architecture apply to it only
        ns.model_kwargs = dict(DEFAULT_MODEL_KWARGS.get(ns.model, {}))
    ns.model_kwargs = {**ns.model_kwargs, **pooling_for_init(ns.init, ns.objective, ns.model_kwargs)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    train = TrainConfig(**{k: v for k, v in vars(ns).items() if k in train_keys})
    objective_cls = objectives.get(train.objective)
    options = objective_cls.Options(**vars(ns[train.objective]))
    objective_cls.check_options(train, options)
    check(train)
    return RunConfig(train, options, ns, parser, prog, aux_options=check_aux(train, ns, options))


def check_aux(train: TrainConfig, ns: Namespace, options) -> Optional[object]:
    """--aux's options, checked, once it is known that the pair can train jointly (None without --aux)."""
    if not train.aux:
        return None
    if train.aux not in objectives.OBJECTIVES:
        raise UsageError(f"--aux {train.aux}: no such objective. Available: {', '.join(sorted(objectives.OBJECTIVES))}.")
    main, aux = objectives.get(train.objective), objectives.get(train.aux)
    if not main.needs_labels or aux.needs_labels:
        raise UsageError(f"--aux {train.aux} with --objective {train.objective}: joint training adds a self-supervised "
                         f"objective (mae, simmim, dino, mocov3, ...) to one that learns from labels (supervised).")  # fmt: skip
    if main.unlabeled(train, options) is not None:
        raise UsageError(f"--aux with --objective {train.objective}: that objective already draws the second stream "
                         f"of unlabeled images that --aux would use; use --objective supervised.")  # fmt: skip
    if train.streaming:
        raise UsageError("--aux draws a second stream of every training image, which --streaming does not provide: "
                         "drop --streaming (ssvit prepare writes shards that load without it).")  # fmt: skip
    aux_options = aux.Options(**vars(ns[train.aux]))
    aux.check_options(train, aux_options)
    return aux_options


def pooling_for_init(init: Optional[str], objective: str, model_kwargs: dict) -> dict:
    """pooling_for the ssvit checkpoint --init names, when this run trains a classifier on it."""
    if not init or not objectives.get(objective).needs_labels or not Path(init).exists():
        return {}
    return pooling_for((saved_config(init) or {}).get("objective"), model_kwargs)


def _ranges(cfg: TrainConfig) -> list[tuple[str, object, bool, str]]:
    """(option, value, within range, the range in words) for every numeric option of TrainConfig."""
    unit = lambda v, closed_hi=False: v is None or 0 < v < 1 or (closed_hi and v == 1)  # noqa: E731
    lo, hi = cfg.crop_scale
    return [
        *[(name, getattr(cfg, name), getattr(cfg, name) >= 1, "a positive whole number") for name in
          ("max_steps", "batch_size", "gradient_accumulation_steps", "logging_steps", "eval_steps", "save_steps",
           "save_total_limit", "img_size")],  # fmt: skip
        *[(name, getattr(cfg, name), getattr(cfg, name) is None or getattr(cfg, name) >= 1, "a positive whole number, or null")
          for name in ("samples_per_class", "eval_batches", "cpu_threads", "lr_base_batch_size")],  # fmt: skip
        ("shuffle_buffer", cfg.shuffle_buffer, cfg.shuffle_buffer >= 1, "1 or more (images)"),
        ("aux_weight", cfg.aux_weight, cfg.aux_weight >= 0, "0 or more"),
        ("aux_ratio", cfg.aux_ratio, cfg.aux_ratio >= 1, "1 or more (images per labelled image)"),
        ("dataloader_num_workers", cfg.dataloader_num_workers, cfg.dataloader_num_workers is None or cfg.dataloader_num_workers >= 0,
         "0 (load in the training process) or more"),
        ("fewshot_steps", cfg.fewshot_steps, cfg.fewshot_steps is None or cfg.fewshot_steps >= 0, "0 (never), a number of steps, or null (at the end only)"),
        ("lr", cfg.lr, cfg.lr > 0, "positive (the peak learning rate)"),
        ("warmup_steps", cfg.warmup_steps, cfg.warmup_steps >= 0, "0 or more"),
        ("weight_decay", cfg.weight_decay, cfg.weight_decay >= 0, "0 or more"),
        ("max_grad_norm", cfg.max_grad_norm, cfg.max_grad_norm is None or cfg.max_grad_norm > 0, "above 0, or null to disable clipping"),
        ("val_fraction", cfg.val_fraction, unit(cfg.val_fraction), "a fraction between 0 and 1"),
        ("test_fraction", cfg.test_fraction, unit(cfg.test_fraction), "a fraction between 0 and 1"),
        ("label_fraction", cfg.label_fraction, unit(cfg.label_fraction, closed_hi=True), "a fraction between 0 and 1"),
        ("crop_scale", list(cfg.crop_scale), 0 < lo <= hi <= 1, "[min, max] with 0 < min <= max <= 1 (shares of the image area)"),
        ("ema_decay", cfg.ema_decay, unit(cfg.ema_decay), "between 0 and 1 (e.g. 0.9999), or null for none"),
        ("layer_decay", cfg.layer_decay, unit(cfg.layer_decay, closed_hi=True), "in (0, 1] (e.g. 0.75), or null for none"),
        ("momentum", cfg.momentum, 0 <= cfg.momentum < 1, "in [0, 1)"),
        ("drop_path_rate", cfg.drop_path_rate, cfg.drop_path_rate is None or 0 <= cfg.drop_path_rate < 1, "in [0, 1), or null"),
        ("adam_beta1", cfg.adam_beta1, 0 <= cfg.adam_beta1 < 1, "in [0, 1)"),
        ("adam_beta2", cfg.adam_beta2, 0 <= cfg.adam_beta2 < 1, "in [0, 1)"),
    ]


def check(cfg: TrainConfig) -> None:
    """Refuse a bad configuration at start-up, before any data is read or model built, naming every problem."""
    problems = range_problems(_ranges(cfg))
    try:
        DataSource.parse(cfg.data)
    except UsageError as e:
        problems.append(str(e))
    if problems:
        raise UsageError("\n".join(problems))


def check_paths(cfg: TrainConfig) -> None:
    """Refuse missing --init, --data and --resume paths when a run starts (before anything is read or written;
    parsing a preset alone does not need its paths to exist)."""
    problems = []
    if cfg.init and not cfg.init.startswith("timm:"):
        if not Path(cfg.init).exists():
            problems.append(f"--init {cfg.init}: no such file or folder. Give an ssvit checkpoint folder "
                            f"(runs/<name>/checkpoints/step_NNNNNN), an exported backbone folder, or timm:<name>.")  # fmt: skip
        else:
            try:
                read_state_dict(cfg.init, header_only=True)
            except (UsageError, FileNotFoundError) as e:
                problems.append(str(e))
    source = DataSource.parse(cfg.data)
    if source.is_local and not any(ch in source.location for ch in "*?[") and not Path(source.location).exists():
        problems.append(f"--data {cfg.data}: {source.location} does not exist.")
    if cfg.resume not in (None, "latest", "auto", "true", "True") and not Path(cfg.resume).is_dir():
        problems.append(f"--resume {cfg.resume}: no such checkpoint folder (a bare --resume takes the newest in --output_dir).")
    if problems:
        raise UsageError("\n".join(problems))


# ----------------------------------------------------------------------------------------------------------
# Presets and saved runs

def preset(name: str) -> dict:
    """A preset of configs/ as flat parser defaults ({"lr": 0.01, "supervised.head": "linear", ...})."""
    values = yaml.safe_load((preset_dir() / f"{name}.yaml").read_text())
    flat = {}
    for key, value in values.items():
        if key in objectives.OBJECTIVES and isinstance(value, dict):
            flat |= {f"{key}.{k}": v for k, v in value.items()}
        else:
            flat[key] = value
    return flat


def saved_train_config(checkpoint: str | Path) -> TrainConfig:
    """The TrainConfig of the run that wrote an ssvit checkpoint (keys a newer ssvit does not know are dropped)."""
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"{checkpoint}: no such file or folder (give an ssvit checkpoint folder).")
    saved = saved_config(checkpoint)
    if saved is None or "model" not in saved:
        raise FileNotFoundError(f"{checkpoint}: no config.yaml beside it; is it an ssvit checkpoint?")
    return TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})


def finetune_defaults(argv: list[str]) -> dict:
    """Parser defaults of ssvit/finetune.py: configs/finetune.yaml, then the architecture of --init."""
    init = next((a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv) if a.split("=")[0] == "--init"), None)
    if init is None and ("--help" in argv or "-h" in argv):
        return preset("finetune")
    if init is None:
        raise UsageError("--init is required (an ssvit checkpoint, an exported backbone folder, or timm:<name>).")
    return {**preset("finetune"), **init_architecture(init)}
