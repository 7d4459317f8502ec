"""Supervised versus self-supervised: run the ViT paper's comparison as one resumable study and report it.

    accelerate launch ssvit/compare.py --config compare_cifar10_cpu
    accelerate launch ssvit/compare.py --config compare_cifar10_budget_cpu   # compute on the x-axis

Arms: from scratch, supervised-pretrained (all training labels), and one arm per self-supervised objective in
`objectives` (pretrained on the same images without labels), each fine-tuned with the same backbone, data,
augmentation and fine-tuning budget at every label fraction and seed. With `budgets`, the study instead runs scratch
and every objective at equal totals of training FLOPs, each objective splitting a budget between pretraining and
fine-tuning (run_budget_study). Ablations are extra pretrainings of the first objective compared by few-shot accuracy.
Every run is an ordinary ssvit run in <output_dir>/runs/<name>: a finished run (its results.json exists) is
never run again, an interrupted one resumes from its last checkpoint.
Writes results.csv, results.md (mean and 95% confidence interval over seeds, gains paired by seed) and PNG plots.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import yaml

from ssvit.config import TrainConfig, parse, preset, saved_train_config
from ssvit.models import saved_config
from ssvit.cli import make_parser, parse_args
from ssvit.errors import UsageError, command


@dataclass
class Study:
    """A comparison study (configs/compare_*.yaml). Every mapping holds ssvit flags without the dashes."""

    output_dir: str
    base: dict = field(default_factory=dict)
    """Flags shared by every run: model, data, img_size, precision..."""
    pretrain: dict = field(default_factory=dict)
    """Flags of every pretraining (steps, batch, lr)."""
    objectives: dict = field(default_factory=lambda: {"masked_patch": {}})
    """The self-supervised arms: objective name -> its extra pretraining flags, e.g. {mae: {adam_beta2: 0.95,
    mae.mask_ratio: 0.75}}. Any registered objective."""
    supervised: dict = field(default_factory=dict)
    """Extra flags of the supervised pretraining."""
    finetune: dict = field(default_factory=dict)
    """Fine-tuning flags, the same for every arm."""
    label_fractions: list = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    ablations: dict = field(default_factory=dict)
    """name -> extra flags of the first objective, e.g. {mask_ratio_0.15: {masked_patch.mask_ratio: 0.15}}."""
    arms: Optional[list] = None
    """Which arms run: scratch, scratch_matched, supervised and the objectives' names (unset: all of them). With
    budgets: the cells' own names (scratch, semi, joint, <objective><share>, <objective><share>+<read-out>...)."""
    budgets: Optional[list] = field(default_factory=list)
    """Compute on the x-axis: budgets in images of fine-tuning from scratch; every arm of a budget spends the same
    training FLOPs (counted per image of each objective with FlopCounterMode). When given, the study runs scratch and
    every objective at each budget instead of the arms (run_budget_study); [] or null: a fixed-budget study."""
    pretrain_shares: list = field(default_factory=lambda: [0.5, 0.75])
    """With budgets: the shares of a budget's FLOPs that an objective spends on pretraining, the rest on fine-tuning.
    The report reads each objective at the share that is best on validation, budget by budget."""
    semi: Optional[dict] = None
    """With budgets: flags of a semi-supervised fine-tuning (e.g. {objective: fixmatch, fixmatch.mu: 7}) on top of the
    fine-tuning flags. Every budget then also runs it from scratch (arm semi, the honest competitor of pretraining) and
    from each pretraining (arms <objective><share>+semi), at the same FLOPs: its unlabeled images and any teacher's
    forward are counted, so it fine-tunes on fewer labelled images."""
    semi_after_finetune: Optional[float] = None
    """With semi: also run Semi-ViT's order (arXiv 2208.05688, section 3.1): supervised fine-tuning on this share of a
    cell's fine-tuning FLOPs first, then semi-supervised fine-tuning from that classifier (its head kept, the EMA teacher
    starting from it, so pseudo-labels start confident) on the rest; arms ft+semi and <objective><share>+ft+semi, read
    beside semi and <objective>+semi as another read-out ("ft first")."""
    readouts: dict = field(default_factory=dict)
    """With budgets: other ways to read each pretraining, name -> flags on top of the fine-tuning flags, e.g.
    {ld: {layer_decay: 0.75, lr: 0.01}, probe: {freeze_backbone: true, lr: 0.1}}. Every pretrained cell also runs each
    on the same fine-tuning images (a probe spends fewer FLOPs, never more), and the report reads each objective at
    its best (share, read-out) on validation."""
    lsq: bool = False
    """With budgets: also read each pretraining with no training at all (arms <objective><share>+lsq): the ViT paper's
    few-shot linear read-out (section 4.1: regularised least squares to {-1, 1}^K, closed form) fitted on the frozen,
    un-augmented features of all the cell's labelled images, its L2 chosen by leave-one-out on those same images (no
    other labels). Its FLOPs: the pretraining's plus a fine-tuning image's per labelled image (a forward is a third of
    that: counted high, never low); the fine-tuning share of the budget is left unspent."""
    joint: Optional[dict] = None
    """With budgets: flags of joint training (e.g. {aux: mae, aux_weight: 1.0}) on top of the fine-tuning flags. Every
    budget then also runs it from scratch (arm joint): the labelled batch plus the aux objective on every training
    image, at the same FLOPs (the aux's images counted), so it trains on fewer labelled images."""
    frozen: bool = True
    """Evaluate every pretraining's frozen features (few-shot, linear probe, DINO's weighted 20-NN) on the test split,
    beside the same architecture at random initialisation."""
    frozen_max_train: int = 10_000
    """Un-augmented training images the linear probe and k-NN fit on (the few-shot shots are drawn from them)."""

    def arm_names(self) -> list[str]:
        """scratch: fine-tuning's budget only. scratch_matched: from scratch on the labelled subset for as many
        images as the first objective's pretraining plus fine-tuning process (label fractions below 1; at 1 the
        supervised arm is that). supervised and each objective: pretrained on all training images (with / without
        labels), then fine-tuned."""
        return picked(self.arms, ["scratch", "scratch_matched", "supervised", *self.objectives], "this study")

    def pretraining_flags(self, arm: str) -> dict:
        return self.supervised if arm == "supervised" else self.objectives[arm]


def resolved(study: Study, arm: str) -> tuple[dict, dict]:
    """(pretraining flags, fine-tuning flags) of an arm as its runs see them: defaults, base, then the study's."""
    pretrain = {}
    if arm in ("supervised", *study.objectives):
        pretrain = {**vars(TrainConfig()), **study.base, **study.pretrain, **study.pretraining_flags(arm)}
    return pretrain, {**preset("finetune"), **study.base, **study.finetune}


def first_objective(study: Study) -> str:
    if not study.objectives:
        raise UsageError("objectives: the study needs at least one self-supervised objective, e.g. {masked_patch: {}}.")
    return next(iter(study.objectives))


def images_processed(study: Study, arm: str) -> int:
    pretrain, finetune = resolved(study, arm if arm != "scratch_matched" else first_objective(study))
    images = finetune["max_steps"] * finetune["batch_size"]
    return images + (pretrain["max_steps"] * pretrain["batch_size"] if pretrain and arm != "scratch" else 0)


def with_steps(flags: dict, resolved_flags: dict, steps: int) -> dict:
    """`flags` run for `steps` steps; the warmup keeps its share of the (longer or shorter) schedule."""
    warmup = round(resolved_flags["warmup_steps"] * steps / resolved_flags["max_steps"])
    return {**flags, "max_steps": steps, "warmup_steps": warmup}


def finetune_flags(study: Study, arm: str) -> dict:
    """The fine-tuning flags of an arm. scratch_matched runs as many fine-tuning-batch steps as the first objective's
    pretraining plus fine-tuning process images, with the fine-tuning lr."""
    if arm != "scratch_matched":
        return study.finetune
    _, finetune = resolved(study, arm)
    return with_steps(study.finetune, finetune, math.ceil(images_processed(study, arm) / finetune["batch_size"]))


def flags(mapping: dict) -> list[str]:
    out = []
    for key, value in mapping.items():
        out += [f"--{key}", value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()]
    return [a.removesuffix("\n...") for a in out]


def run_once(argv: list[str], output_dir: Path, defaults: Optional[dict] = None) -> dict:
    """An ssvit run that is skipped when finished and resumed when interrupted, provided that it was made with
    the same settings: a study finds its runs by name, and a changed recipe must not reuse the old results."""
    from ssvit.train import train

    run = parse([*argv, "--output_dir", str(output_dir), "--resume", "auto"], defaults=defaults)
    saved = output_dir / "config.yaml"
    if saved.exists():
        old, new = yaml.safe_load(saved.read_text()), yaml.safe_load(run.dump())
        changed = [c for c in changed_settings(old, new, yaml.safe_load(parse([]).dump())) if c[0] != "resume"]
        if changed:
            diff = "; ".join(f"{k}: {was!r} there, {now!r} now" for k, was, now in changed[:5])
            raise UsageError(f"{output_dir} was made with other settings ({diff}). The study reuses finished runs by "
                             f"name: delete that folder to run it with the new settings, or give the study another output_dir.")  # fmt: skip
    done = output_dir / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    return train(run)


def changed_settings(old: dict, new: dict, default: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, saved value, value now) of each setting that differs, nested options key by key. A setting the
    saved run does not record was added to ssvit after it was made, and the run ran as its default does."""
    out = []
    for key in sorted(old.keys() | new.keys()):
        was, now, dflt = old.get(key, default.get(key)), new.get(key), default.get(key)
        if isinstance(was, dict) and isinstance(now, dict):
            out += changed_settings(was, now, dflt if isinstance(dflt, dict) else {}, f"{prefix}{key}.")
        elif was != now:
            out.append((prefix + key, was, now))
    return out


def flops_per_image(run_dir: Path) -> float:
    """FLOPs of one training image (forward and backward) of a run's objective, counted with FlopCounterMode."""
    return counted_flops(["--config", str(run_dir / "config.yaml")])


def counted_flops(argv: list[str], defaults: Optional[dict] = None) -> float:
    """FLOPs of one training image (forward and backward) of the run `argv` describes, before it runs."""
    from torch.utils.flop_counter import FlopCounterMode

    from ssvit.train import build_objective, example_batch, inputs

    run = parse([*argv, "--init", "null"], defaults=defaults)  # the architecture, not the weights
    model = build_objective(run, num_classes=10)
    # A multi-crop objective pays for every crop, a semi-supervised one for its unlabeled images (and a teacher's
    # forward): FLOPs per labelled image.
    batch = example_batch(run, 2)
    with FlopCounterMode(display=False) as counter:
        model(*inputs(batch)).loss.backward()
    return counter.get_total_flops() / 2


def pretraining_images(run_dir: Path) -> int:
    saved = saved_config(run_dir)
    return saved["max_steps"] * saved["batch_size"] * saved["gradient_accumulation_steps"]


def recorded(done: Path, made_with: dict) -> Optional[dict]:
    """A measurement recorded by record(), if `done` holds one made with these settings (a damaged or missing
    record, e.g. from a kill mid-write, is measured again)."""
    try:
        saved = json.loads(done.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.pop("made_with", None) == made_with else None


def record(done: Path, result: dict, made_with: dict) -> dict:
    """Write a measurement with the settings it was made with, whole or not at all (a temporary file, then renamed)."""
    done.parent.mkdir(parents=True, exist_ok=True)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps({**result, "made_with": made_with}, indent=2) + "\n")
    os.replace(tmp, done)
    return result


def pretraining_flops(run_dir: Path) -> float:
    """FLOPs of the whole pretraining: FLOPs per image times the images it processed."""
    return flops_per_image(run_dir) * pretraining_images(run_dir)


def main_process_first(measure: Callable[..., dict]) -> Callable[..., dict]:
    """A measurement between a study's runs, recorded in a file: under several processes the main process measures
    and records it, then the others read its record."""

    @functools.wraps(measure)
    def once(*args, **kwargs) -> dict:
        from ssvit.train import process_state

        with process_state().main_process_first():
            return measure(*args, **kwargs)

    return once


def main_process_only(write: Callable[..., None]) -> Callable[..., None]:
    """A study's report: written by the main process alone (every process holds the same rows)."""

    @functools.wraps(write)
    def once(*args, **kwargs) -> None:
        from ssvit.train import process_state

        if process_state().is_main_process:
            write(*args, **kwargs)

    return once


@main_process_first
def frozen_row(study: Study, name: str, checkpoint: Optional[Path], done: Path, **extra) -> dict:
    """Frozen-feature quality of a pretraining's released backbone, or of random weights (checkpoint None, the
    study's architecture, seed 0, its mean patch token): few-shot linear at 1/5/10/25 shots (3 draws), a linear probe
    and DINO's weighted 20-NN, on the test split where the data has one. Computed once into `done`, like a run, and
    measured again when the evaluation it was made with (the weights, the fit's size, the random architecture) differs."""
    made_with = {"checkpoint": str(checkpoint), "max_train": study.frozen_max_train, "base": study.base if checkpoint is None else None}
    saved = recorded(done, made_with)
    if saved is not None:
        return saved
    import torch

    from ssvit.data import load_splits
    from ssvit.features import evaluate_backbone, representation_for
    from ssvit.models import build_timm_model, create_backbone
    from ssvit.train import process_state, share_cores

    if checkpoint is None:
        cfg = parse([*flags(study.base), "--init", "null"]).train
        torch.manual_seed(0)
        backbone, representation = create_backbone(cfg.model, cfg.img_size, cfg.model_kwargs), "mean"
    else:
        cfg = saved_train_config(checkpoint)
        backbone, representation = build_timm_model(checkpoint)[0], representation_for(cfg.objective, "auto")
        cfg.label_fraction = cfg.samples_per_class = None  # a supervised pretraining's features, read on all images
    share_cores(cfg.cpu_threads)  # this may run before any training has claimed the cores back from accelerate launch
    splits = load_splits(cfg)
    if not splits.num_classes:
        raise UsageError(f"frozen features are scored against labels: {cfg.data} has none. Set frozen: false in the study, "
                         f"or give data with labels (an image folder with a subfolder per class, or a label column).")  # fmt: skip
    split = "test" if splits.test is not None else "val"
    device = process_state().device
    measured = evaluate_backbone(backbone.to(device), replace(splits, val=splits.val if splits.test is None else splits.test),
                                 representation, max_train=study.frozen_max_train, device=device)  # fmt: skip
    keep = [k for k in measured if k.startswith(("fewshot", "linear_probe", "knn20", "train_images"))]
    row = {"kind": "frozen", "arm": name, "split": split, "representation": representation, **extra,
           **{k: measured[k] for k in keep}}  # fmt: skip
    return record(done, row, made_with)


def random_init_row(study: Study) -> dict:
    return frozen_row(study, "random weights", None, Path(study.output_dir) / "runs/random_init/study_frozen.json",
                      pretrain_images=0, pretrain_flops=0.0)  # fmt: skip


FROZEN_HEADER = ["| pretraining | pretraining images | pretraining FLOPs | features | 1-shot | 5-shot | 10-shot | 25-shot "
                 "| linear probe | weighted 20-NN |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip


def frozen_table(rows: list[dict]) -> list[str]:
    frozen = [r for r in rows if r["kind"] == "frozen"]
    if not frozen:
        return []
    return ["", f"Frozen features on the {frozen[0]['split']} split: few-shot linear (mean of 3 draws of the shots), linear "
                f"probe and weighted 20-NN fitted on {frozen[0]['train_images']:,} un-augmented training images.", "", *FROZEN_HEADER,
            *map(frozen_line, frozen)]  # fmt: skip


def frozen_line(r: dict) -> str:
    metrics = [r.get(f"fewshot_{n}shot", float("nan")) for n in (1, 5, 10, 25)] + [r.get("linear_probe", float("nan")), r["knn20_weighted"]]
    return (f"| {r['arm']} | {r['pretrain_images']:,} | {r['pretrain_flops']:.3g} | {r['representation']} | "
            + " | ".join(f"{m:.2%}" for m in metrics) + " |")  # fmt: skip


# Two-sided 95% quantiles of Student's t by degrees of freedom (seeds - 1); the normal 1.96 beyond.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def confidence_interval(values: list[float]) -> float:
    """Half-width of the 95% confidence interval of the mean over seeds (Student's t)."""
    if len(values) < 2:
        return float("nan")
    return T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def top1_by_seed(rows: list[dict], arm: str, fraction: float, key: str = "top1") -> dict:
    return {r["seed"]: r[key] for r in rows if r["kind"] == "finetune" and r["arm"] == arm and r["label_fraction"] == fraction}


def paired_difference(arm: dict, scratch: dict) -> Optional[tuple[float, float]]:
    """Mean and 95% interval of (arm - scratch) over the seeds both ran. A seed fixes the label subset and the
    data order for every arm, so pairing removes that share of the spread from the comparison."""
    diffs = [arm[s] - scratch[s] for s in arm if s in scratch]
    return (statistics.mean(diffs), confidence_interval(diffs)) if len(diffs) >= 2 else None


@dataclass(frozen=True)
class Cell:
    """One cell of a budget study: an arm (scratch, or an objective at a pretraining share; each fine-tuned plainly or
    semi-supervised) at a budget."""

    arm: str
    objective: Optional[str]
    share: float
    budget: int
    pretrain_images: int
    finetune_images: int
    """Labelled images the fine-tuning trains on (a semi-supervised one also draws its unlabeled images beside them)."""
    semi: bool = False
    joint: bool = False
    supervised_images: int = 0
    """Labelled images of a supervised fine-tuning that runs before the semi-supervised one (Semi-ViT's order)."""
    readout: str = ""
    """The read-out of the pretraining (a name in Study.readouts, or lsq), or "" for the fine-tuning flags alone."""

    @property
    def family(self) -> str:
        """What the study reads at its best share, budget by budget: scratch, semi, joint, an objective, or
        <objective>+semi."""
        if self.objective is None:
            return "semi" if self.semi else "joint" if self.joint else "scratch"
        return f"{self.objective}+semi" if self.semi else self.objective


def pretraining_argv(study: Study, objective: str, steps: Optional[int] = None, extra: Optional[dict] = None) -> list[str]:
    pretrain, _ = resolved(study, objective)
    own = {**study.pretrain, **study.pretraining_flags(objective), **(extra or {})}
    return [*flags(study.base), "--objective", objective, "--fewshot_steps", "0",
            *flags(with_steps(own, pretrain, steps) if steps else own)]  # fmt: skip


def budget_plan(study: Study) -> list[Cell]:
    """Every cell of a budget study, checked before any work is done. A budget B is the FLOPs of fine-tuning from
    scratch on B images: scratch spends it all on fine-tuning; an objective at share s spends s of those FLOPs on
    pretraining (as many images, in whole batches, as its own FLOPs per image allow: MAE's encoder sees a quarter
    of the tokens, so it pretrains on more images) and fine-tunes on the (1 - s) B images left."""
    for budget in study.budgets:
        if not isinstance(budget, int) or budget <= 0:
            raise UsageError(f"budgets: {budget!r} is not a number of images (a positive whole number, e.g. 32768).")
    for share in study.pretrain_shares:
        if not 0 < share < 1:
            raise UsageError(f"pretrain_shares: {share} is not a share of a budget between 0 and 1 (scratch, share 0, always runs).")
    _, finetune = resolved(study, first_objective(study))
    cells = []
    for budget in study.budgets:
        cells.append(Cell("scratch", None, 0.0, budget, 0, budget))
        for share in study.pretrain_shares:
            fine = budget - round(share * budget)
            if fine % finetune["batch_size"]:
                raise UsageError(f"budget {budget} at pretraining share {share}: {fine} fine-tuning images are not a whole "
                                 f"number of batches of {finetune['batch_size']}. Choose budgets that are multiples of it.")  # fmt: skip
    # FLOPs counted once every budget is known to fit: fine-tuning's, and each objective's pretraining's.
    fine_flops = counted_flops([*flags(study.base), *flags(study.finetune)], defaults=preset("finetune"))
    for objective in study.objectives:
        per_image = counted_flops(pretraining_argv(study, objective))
        batch = resolved(study, objective)[0]["batch_size"]
        for budget in study.budgets:
            for share in study.pretrain_shares:
                batches = round(share * budget * fine_flops / per_image / batch)
                if batches < 1:
                    raise UsageError(f"budget {budget} at pretraining share {share}: {objective} would pretrain on less than "
                                     f"one batch of {batch} at the same FLOPs ({per_image:.3g} FLOPs per image against "
                                     f"{fine_flops:.3g} for fine-tuning). Raise the budget or lower the pretraining batch.")  # fmt: skip
                cells.append(Cell(f"{objective}{share:g}", objective, share, budget, batches * batch, budget - round(share * budget)))
    def afforded(cell: Cell, per_image: float, what: str) -> int:
        """Labelled images, in whole batches, that the FLOPs of the cell's fine-tuning buy at per_image each."""
        fine = round(cell.finetune_images * fine_flops / per_image / finetune["batch_size"]) * finetune["batch_size"]
        if fine < finetune["batch_size"]:
            raise UsageError(f"budget {cell.budget}: the {what} of {cell.arm} would train on less than one batch of "
                             f"{finetune['batch_size']} at the same FLOPs ({per_image:.3g} FLOPs per labelled image against "
                             f"{fine_flops:.3g}). Raise the budget, or lower its unlabeled ratio.")  # fmt: skip
        return fine

    scratch, pretrained = [c for c in cells if c.objective is None], [c for c in cells if c.objective is not None]
    if study.semi is not None:  # each cell again, fine-tuned semi-supervised on what fine-tuning's FLOPs buy it
        semi_flops = counted_flops(semi_argv(study), defaults=preset("finetune"))
        for cell in list(cells):
            arm = "semi" if cell.objective is None else f"{cell.arm}+semi"
            cells.append(replace(cell, arm=arm, finetune_images=afforded(cell, semi_flops, "semi-supervised fine-tuning"), semi=True))
            if study.semi_after_finetune is not None:  # Semi-ViT's order: the supervised share first, in whole batches
                first = round(study.semi_after_finetune * cell.finetune_images / finetune["batch_size"]) * finetune["batch_size"]
                if not 0 < first < cell.finetune_images:
                    raise UsageError(f"semi_after_finetune: {study.semi_after_finetune} of the {cell.finetune_images:,} fine-tuning "
                                     f"images of {cell.arm} at budget {cell.budget:,} leaves no whole batch of {finetune['batch_size']} "
                                     f"to one of the two fine-tunings. Give a share between 0 and 1 that does, or a larger budget.")  # fmt: skip
                rest = replace(cell, finetune_images=cell.finetune_images - first)
                cells.append(replace(cell, arm=arm.replace("semi", "ft+semi"), semi=True, supervised_images=first, readout="ft first",
                                     finetune_images=afforded(rest, semi_flops, "semi-supervised fine-tuning after fine-tuning")))  # fmt: skip
    if study.joint is not None:  # scratch's cells again, trained jointly with the aux objective
        joint_flops = counted_flops(joint_argv(study), defaults=preset("finetune"))
        cells += [replace(c, arm="joint", finetune_images=afforded(c, joint_flops, "joint training"), joint=True) for c in scratch]
    # each pretraining read other ways, on the same fine-tuning images, and (lsq) without fine-tuning
    cells += [replace(c, arm=f"{c.arm}+{name}", readout=name) for c in pretrained for name in study.readouts]
    cells += [replace(c, arm=f"{c.arm}+lsq", readout="lsq", finetune_images=0) for c in pretrained if study.lsq]
    arms = picked(study.arms, list(dict.fromkeys(c.arm for c in cells)), "this budget study")
    return [c for c in cells if c.arm in arms]


def picked(requested: Optional[list], names: list[str], study: str) -> list[str]:
    """The arms `requested` names, in the study's order (None: all of them). A part of the grid; a name it does not
    have is refused, not skipped, and so is an empty list, which would run nothing."""
    unknown = [a for a in requested or [] if a not in names]
    if unknown or requested == []:
        what = f"{', '.join(unknown)} is not an arm" if unknown else "[] names no arm"
        raise UsageError(f"arms: {what} of {study} (its arms: {', '.join(names)}). Name some of those, or remove arms "
                         f"to run them all.")  # fmt: skip
    return [a for a in names if requested is None or a in requested]


def check_semi(study: Study) -> None:
    """`semi` is refused where it would be ignored (a fixed-budget study) or would not be semi-supervised."""
    from ssvit import objectives

    if not study.budgets:
        raise UsageError("semi: semi-supervised arms are part of budget studies: add budgets (e.g. [16384]), or remove semi.")
    name = study.semi.get("objective", "supervised")
    source = objectives.get(name)
    if not source.needs_labels or source.unlabeled(TrainConfig(objective=name), source.Options()) is None:
        raise UsageError(f"semi: objective {name} does not fine-tune on labelled and unlabeled images; name one that does, "
                         f"such as fixmatch.")  # fmt: skip


def semi_argv(study: Study) -> list[str]:
    return [*flags(study.base), *flags({**study.finetune, **(study.semi or {})})]


def joint_argv(study: Study) -> list[str]:
    return [*flags(study.base), *flags({**study.finetune, **(study.joint or {})})]


def budget_pretraining(study: Study, objective: str, images: int) -> Path:
    """The checkpoint of `objective` pretrained on `images` images: one per objective and size, shared by seeds and
    label fractions."""
    pretrain, _ = resolved(study, objective)
    argv = pretraining_argv(study, objective, images // pretrain["batch_size"])
    return Path(run_once(argv, Path(study.output_dir) / "runs" / f"pretrain_{objective}_{images}")["checkpoint"])


def run_budget_study(study: Study) -> list[dict]:
    """Compute on the x-axis (the paper's Figure 5 is the model): scratch and every objective at the same total
    training FLOPs, each objective splitting each budget between pretraining and fine-tuning in one or more ways.
    The report pairs each cell by seed with scratch at the same budget and, where the grid has it, scratch with the
    same fine-tuning images, and says where each objective passes scratch (budget_summary)."""
    root = Path(study.output_dir)
    plan = budget_plan(study)
    _, finetune = resolved(study, first_objective(study))
    rows = [random_init_row(study)] if study.frozen else []
    checkpoints, flops = {}, {}
    # Budget by budget, smallest first: an interrupted study already has whole curves, every seed paired, up to
    # the budget it reached. Each budget's pretrainings run (and their frozen features are read) before its cells.
    for budget in sorted(set(study.budgets)):
        cells = [c for c in plan if c.budget == budget]
        for objective, images in dict.fromkeys((c.objective, c.pretrain_images) for c in cells if c.objective):
            if (objective, images) in checkpoints:
                continue
            checkpoints[objective, images] = checkpoint = budget_pretraining(study, objective, images)
            flops.setdefault(objective, flops_per_image(checkpoint.parents[1]))
            if study.frozen:
                rows.append(frozen_row(study, objective, checkpoint, checkpoint.parents[1] / "study_frozen.json",
                                       pretrain_images=images, pretrain_flops=images * flops[objective]))  # fmt: skip
        for seed in study.seeds:
            for fraction in study.label_fractions:
                for cell in cells:
                    pre, first, fine = cell.pretrain_images, cell.supervised_images, cell.finetune_images
                    if cell.readout == "lsq":
                        rows.append(lsq_row(study, cell, checkpoints[cell.objective, pre], fraction, seed, flops[cell.objective]))
                        write_budget_report(rows, root)
                        continue
                    init = ["--init", str(checkpoints[cell.objective, pre])] if cell.objective else []
                    split = ["--label_fraction", str(fraction), "--seed", str(seed), "--fewshot_steps", "0"]
                    if first:  # Semi-ViT's order: the semi-supervised fine-tuning starts from this supervised one
                        argv = [*flags(study.base), *init, *flags(with_steps(study.finetune, finetune, first // finetune["batch_size"])), *split]
                        first_dir = root / "runs" / f"finetune_{cell.arm}_first_images{pre + first}_frac{fraction}_seed{seed}"
                        init = ["--init", run_once(argv, first_dir, defaults=preset("finetune"))["checkpoint"]]
                        flops.setdefault("finetune", flops_per_image(first_dir))
                    tuning = {**study.finetune, **(study.semi if cell.semi else {}), **(study.joint if cell.joint else {}),
                              **study.readouts.get(cell.readout, {})}  # fmt: skip
                    argv = [*flags(study.base), *init, *flags(with_steps(tuning, finetune, fine // finetune["batch_size"])), *split]
                    run_dir = root / "runs" / f"finetune_{cell.arm}_images{pre + first + fine}_frac{fraction}_seed{seed}"
                    result = run_once(argv, run_dir, defaults=preset("finetune"))
                    kind = "semi" if cell.semi else "joint" if cell.joint else f"readout {cell.readout}" if cell.readout else "finetune"
                    flops.setdefault(kind, flops_per_image(run_dir))
                    rows.append({"kind": "budget", "arm": cell.arm, "objective": cell.objective or "", "family": cell.family,
                                 "share": cell.share, "readout": cell.readout, "budget": cell.budget, "label_fraction": fraction, "seed": seed,
                                 "images": pre + first + fine, "pretrain_images": pre, "finetune_images": first + fine,
                                 "flops": fine * flops[kind] + (first * flops["finetune"] if first else 0)
                                          + (pre * flops[cell.objective] if cell.objective else 0),
                                 "top1": result.get("test/top1", result["val/top1"]), "val_top1": result["val/top1"],
                                 "split": "test" if "test/top1" in result else "val"})  # fmt: skip
                    write_budget_report(rows, root)
    return rows


@main_process_first
def lsq_row(study: Study, cell: Cell, checkpoint: Path, fraction: float, seed: int, pretrain_per_image: float) -> dict:
    """A budget row of Study.lsq: the read-out fitted on the labelled images the cell's fine-tuning would train on
    (the same flags draw them). Computed once into the cell's folder, like a run, and again if its pretraining changed."""
    from ssvit.features import evaluate_lsq, representation_for
    from ssvit.models import build_timm_model

    done = Path(study.output_dir) / "runs" / f"finetune_{cell.arm}_images{cell.pretrain_images}_frac{fraction}_seed{seed}" / "lsq.json"
    made_with = {"checkpoint": str(checkpoint), "label_fraction": fraction, "seed": seed}
    result = recorded(done, made_with)
    if result is None:
        from ssvit.data import load_splits
        from ssvit.train import process_state, share_cores

        cfg = parse([*flags(study.base), *flags(study.finetune), "--label_fraction", str(fraction), "--seed", str(seed)],
                    defaults=preset("finetune")).train  # fmt: skip
        share_cores(cfg.cpu_threads)
        device = process_state().device
        backbone = build_timm_model(checkpoint)[0].to(device)
        result = evaluate_lsq(backbone, load_splits(cfg), representation_for(saved_train_config(checkpoint).objective, "auto"), device)
        record(done, result, made_with)
    fine_per_image = counted_flops([*flags(study.base), *flags(study.finetune)], defaults=preset("finetune"))
    return {"kind": "budget", "arm": cell.arm, "objective": cell.objective, "family": cell.family, "share": cell.share,
            "readout": "lsq", "budget": cell.budget, "label_fraction": fraction, "seed": seed, "images": cell.pretrain_images,
            "pretrain_images": cell.pretrain_images, "finetune_images": 0, "labelled_images": result["labelled_images"],
            "flops": cell.pretrain_images * pretrain_per_image + result["labelled_images"] * fine_per_image,
            "top1": result.get("test/top1", result["val/top1"]), "val_top1": result["val/top1"],
            "split": "test" if "test/top1" in result else "val"}  # fmt: skip


def run_study(study: Study) -> list[dict]:
    root = Path(study.output_dir)
    first = first_objective(study)
    rows = [random_init_row(study)] if study.frozen else []  # first: data it cannot score is refused before any training
    pretrained = {}
    # name -> (objective, its extra flags): the arms' pretrainings, then the ablations of the first objective.
    pretrainings = {name: (name, {}) for name in ("supervised", *study.objectives) if name in study.arm_names()}
    pretrainings |= {f"{first}_{k}": (first, v) for k, v in study.ablations.items()}
    for name, (objective, extra) in pretrainings.items():
        result = run_once(pretraining_argv(study, objective, extra=extra), root / "runs" / f"pretrain_{name}")
        pretrained[name] = Path(result["checkpoint"])

    compute = {name: pretraining_flops(ckpt.parents[1]) for name, ckpt in pretrained.items()}
    for name, ckpt in pretrained.items():  # frozen features of each pretrained backbone
        if study.frozen:
            rows.append(frozen_row(study, name, ckpt, ckpt.parents[1] / "study_frozen.json",
                                   pretrain_images=pretraining_images(ckpt.parents[1]), pretrain_flops=compute[name]))  # fmt: skip

    for arm in study.arm_names():
        for fraction in study.label_fractions:
            if arm == "scratch_matched" and fraction >= 1:
                continue  # with all labels, the supervised arm is scratch with the same compute
            for seed in study.seeds:
                rows.append(finetune_row(study, arm, fraction, seed, pretrained, compute))
    write_report(rows, root, study.arm_names())
    return rows


def finetune_row(study: Study, arm: str, fraction: float, seed: int, pretrained: dict, compute: dict) -> dict:
    """Fine-tune one cell (a finished run is read back) and report it: test top-1, validation beside it, and the
    images the arm processed in all (pretraining included)."""
    init = [] if arm.startswith("scratch") else ["--init", str(pretrained[arm])]
    argv = [*flags(study.base), *init, *flags(finetune_flags(study, arm)), "--label_fraction", str(fraction), "--seed", str(seed),
            "--fewshot_steps", "0"]  # the label subset and the initialisation vary with the seed
    result = run_once(argv, Path(study.output_dir) / "runs" / f"finetune_{arm}_frac{fraction}_seed{seed}", defaults=preset("finetune"))
    return {"kind": "finetune", "arm": arm, "label_fraction": fraction, "seed": seed,
            "pretrain_flops": compute.get(arm, 0.0),
            "images": images_processed(study, arm),
            "top1": result.get("test/top1", result["val/top1"]), "val_top1": result["val/top1"],
            "split": "test" if "test/top1" in result else "val", "top5": result.get("test/top5", result.get("val/top5"))}  # fmt: skip


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)


def by_seed(rows: list[dict], arm: str, fraction: float, budget: int, key: str = "top1") -> dict:
    return {r["seed"]: r[key] for r in rows if r["kind"] == "budget" and (r["arm"], r["label_fraction"], r["budget"]) == (arm, fraction, budget)}


def best_arm(rows: list[dict], family: str, fraction: float, budget: int) -> Optional[str]:
    """The family's cell at this budget (an objective, or an objective then semi-supervised fine-tuning) whose
    pretraining share is best on validation (each at its best, chosen without the test split)."""
    arms = {r["arm"] for r in rows if r["kind"] == "budget" and r["family"] == family
            and (r["label_fraction"], r["budget"]) == (fraction, budget)}  # fmt: skip
    return max(sorted(arms), key=lambda a: statistics.mean(by_seed(rows, a, fraction, budget, "val_top1").values()), default=None)


def per_doubling(curve: dict[int, float], low: int, high: int) -> float:
    return (curve[high] - curve[low]) / math.log2(high / low)


def saturation(curve: dict[int, float]) -> Optional[int]:
    """The first budget from which doubling it gains under one point (per doubling, between neighbouring budgets)."""
    budgets = sorted(curve)
    return next((low for low, high in zip(budgets, budgets[1:]) if per_doubling(curve, low, high) < 0.01), None)


def budget_summary(rows: list[dict]) -> list[str]:
    """What a study says, per label fraction: where scratch saturates, and for each objective (at the share best on
    validation) the budget from which it stays ahead of scratch at the same FLOPs and its paired gain at the largest
    budget."""
    cells = [r for r in rows if r["kind"] == "budget"]
    lines = ["", "Per objective, at each budget the pretraining share that is best on validation; gains paired by seed against "
                 "scratch at the same FLOPs, on the test split.", "",
             "| label fraction | objective | ahead of scratch from budget | largest budget | share there | minus scratch there | seeds |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    notes = []
    for fraction in sorted({r["label_fraction"] for r in cells}):
        scratch = {b: statistics.mean(by_seed(rows, "scratch", fraction, b).values())
                   for b in sorted({r["budget"] for r in cells if r["arm"] == "scratch" and r["label_fraction"] == fraction})}  # fmt: skip
        if not scratch:
            continue
        knee = saturation(scratch)
        top = max(scratch)
        if knee is None and len(scratch) > 1:  # one budget says nothing of a slope
            low = sorted(scratch)[-2]
            notes.append(f"At {fraction:g} of the labels scratch is not saturated within the range: {per_doubling(scratch, low, top):+.2%} "
                         f"per doubling between its two largest budgets ({low:,} and {top:,}).")  # fmt: skip
        elif knee is not None:
            notes.append(f"At {fraction:g} of the labels scratch saturates at a budget of {knee:,} (doubling it gains under one "
                         f"point from there); the largest budget is {top / knee:g}x that.")  # fmt: skip
        for objective in dict.fromkeys(r["family"] for r in cells if r["family"] != "scratch"):
            gains = {}
            for budget in scratch:
                arm = best_arm(rows, objective, fraction, budget)
                if arm is not None:
                    gains[budget] = (arm, paired_difference(by_seed(rows, arm, fraction, budget), by_seed(rows, "scratch", fraction, budget)))
            measured = [b for b in gains if gains[b][1]]
            if not measured:
                continue
            ahead = next((b for i, b in enumerate(measured) if all(gains[c][1][0] > 0 for c in measured[i:])), None)
            last = measured[-1]
            arm, (mean, ci) = gains[last]
            share, readout = next((r["share"], r.get("readout")) for r in cells if r["arm"] == arm)
            seeds = len(set(by_seed(rows, arm, fraction, last)) & set(by_seed(rows, "scratch", fraction, last)))
            lines.append(f"| {fraction:g} | {objective} | {f'{ahead:,}' if ahead else 'not within the range'} | {last:,} | "
                         f"{share:.0%}{f' ({readout})' if readout else ''} | {mean:+.2%} ± {ci:.2%}{' (excludes zero)' if abs(mean) > ci else ''} | {seeds} |")  # fmt: skip
    return [*lines, "", *notes] if len(lines) > 5 else []


@main_process_only
def write_budget_report(rows: list[dict], root: Path) -> None:
    """results.csv, results.md (every cell: mean ± 95% CI over seeds, gains paired by seed; where each objective
    passes scratch; the frozen features of every pretraining) and accuracy_vs_compute.png (top-1 against total
    training FLOPs, images of fine-tuning on the top axis, one panel per label fraction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    write_csv(rows, root / "results.csv")
    budget_rows = [r for r in rows if r["kind"] == "budget"]
    split = budget_rows[0]["split"]
    lines = [f"Fine-tuning top-1 on the {split} split (validation beside it), mean ± 95% CI over seeds; gains paired by seed "
             f"against scratch at the same budget (the same training FLOPs), and with the same fine-tuning images where the "
             f"grid has it.", "",
             f"| arm | label fraction | budget | pretraining + fine-tuning images | total FLOPs | {split} top-1 "
             f"| validation top-1 | minus scratch (same FLOPs) | minus scratch (same fine-tuning images) | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    cells = {(r["arm"], r["label_fraction"], r["budget"]): r for r in budget_rows}
    fractions = sorted({c[1] for c in cells})
    fig, axes = plt.subplots(1, len(fractions), figsize=(5.5 * len(fractions), 4.5), squeeze=False)
    panels = dict(zip(fractions, axes[0]))
    curves = {}
    for (arm, fraction, budget), r in sorted(cells.items(), key=lambda c: (c[0][1], c[0][0] != "scratch", c[0][0], c[0][2])):
        top1 = by_seed(rows, arm, fraction, budget)
        mean, ci = statistics.mean(top1.values()), confidence_interval(list(top1.values()))
        flops = statistics.mean(x["flops"] for x in budget_rows if (x["arm"], x["label_fraction"], x["budget"]) == (arm, fraction, budget))
        fine = r["finetune_images"]
        gains = [paired_difference(top1, by_seed(rows, "scratch", fraction, ref)) if arm != "scratch" else None for ref in (budget, fine)]
        gains = [f"{g[0]:+.2%} ± {g[1]:.2%}" if g else "" for g in gains]
        spread = "" if math.isnan(ci) else f" ± {ci:.2%}"  # one seed has no interval
        lines.append(f"| {arm} | {fraction:g} | {budget:,} | {r['pretrain_images']:,} + {fine:,} | {flops:.3g} | {mean:.2%}{spread} | "
                     f"{statistics.mean(by_seed(rows, arm, fraction, budget, 'val_top1').values()):.2%} | {gains[0]} | {gains[1]} | {len(top1)} |")  # fmt: skip
        label = f"{r['family']}, {r['share']:.0%} of the budget pretraining" if r["objective"] else r["family"]
        label += f", {r['readout']}" if r.get("readout") else ""  # a read-out is its own curve, not a point of the share's
        curves.setdefault((label, fraction), []).append((flops, mean, 0 if math.isnan(ci) else ci))
    for (label, fraction), points in curves.items():
        xs, ys, cis = zip(*points)
        panels[fraction].errorbar(xs, ys, yerr=cis, marker="o", capsize=3, label=label)
    # The top axis counts budgets in scratch's fine-tuning images; a study run without scratch (`arms`) has no such scale.
    scratch = [r["flops"] / r["budget"] for r in budget_rows if r["arm"] == "scratch"]
    per_image = statistics.mean(scratch) if scratch else None
    # A log axis over budgets; over one budget (its cells' FLOPs differ by a batch or two) a linear one with plain ticks.
    budgets = {r["budget"] for r in budget_rows}
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    for fraction, ax in panels.items():
        ax.set(xscale="log" if len(budgets) > 1 else "linear", xlabel="total training compute (FLOPs, pretraining + fine-tuning)",
               ylabel=f"{split} top-1", title=f"{fraction:.0%} of the labels")  # fmt: skip
        axes = [ax.xaxis]
        if per_image:
            top = ax.secondary_xaxis("top", functions=(lambda f: f / per_image, lambda n: n * per_image))
            top.set_xlabel("budget (images of fine-tuning from scratch)")
            axes.append(top.xaxis)
        for axis in axes:
            axis.set_major_locator(MaxNLocator(4))
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "accuracy_vs_compute.png", dpi=150)
    plt.close(fig)
    (root / "results.md").write_text("\n".join([*lines, *budget_summary(rows), *frozen_table(rows)]) + "\n")


@main_process_only
def write_report(rows: list[dict], root: Path, arms: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_csv(rows, root / "results.csv")

    split = next((r["split"] for r in rows if r["kind"] == "finetune"), "val")
    lines = [] if not any(r["kind"] == "finetune" for r in rows) else [f"Fine-tuning top-1 on the {split} split (validation beside it), mean ± 95% CI over seeds; gains paired by seed.", "",
             f"| arm | label fraction | images processed | {split} top-1 | validation top-1 | minus scratch (fine-tuning budget) "
             f"| minus scratch (same images) | seeds |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip (no table without fine-tuning)
    fractions = sorted({r["label_fraction"] for r in rows if r["kind"] == "finetune"})
    series = {}
    for arm in arms:
        for fraction in fractions:
            top1 = top1_by_seed(rows, arm, fraction)
            if not top1:
                continue
            mean, ci = statistics.mean(top1.values()), confidence_interval(list(top1.values()))
            val = list(top1_by_seed(rows, arm, fraction, "val_top1").values())
            series.setdefault(arm, []).append((fraction, mean, ci))
            # "Same images": scratch_matched below 100% labels; at 100% the supervised arm is scratch with that compute.
            matched = "scratch_matched" if fraction < 1 else "supervised"
            gains = [paired_difference(top1, top1_by_seed(rows, ref, fraction)) if arm not in (ref, "scratch") else None
                     for ref in ("scratch", matched)]  # fmt: skip
            gains = [f"{g[0]:+.2%} ± {g[1]:.2%}" if g else "" for g in gains]
            images = next(r["images"] for r in rows if r["kind"] == "finetune" and r["arm"] == arm and r["label_fraction"] == fraction)
            lines.append(f"| {arm} | {fraction:g} | {images:,} | {mean:.2%} ± {ci:.2%} | {statistics.mean(val):.2%} | "
                         f"{gains[0]} | {gains[1]} | {len(top1)} |")  # fmt: skip
    lines += frozen_table(rows)
    (root / "results.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(5, 4))
    for arm, points in series.items():
        xs, ys, cis = zip(*points)
        ax.errorbar(xs, ys, yerr=cis, marker="o", capsize=3, label=arm)
    ax.set(xscale="log", xlabel="fraction of training labels", ylabel=f"{split} top-1", title="Fine-tuning accuracy")
    if series:
        ax.legend()
    fig.tight_layout()
    fig.savefig(root / "accuracy_vs_labels.png", dpi=150)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for r in (r for r in rows if r["kind"] == "frozen" and r["pretrain_flops"]):
        ax.scatter(r["pretrain_flops"], r.get("fewshot_25shot", float("nan")), label=r["arm"])
    ax.set(xscale="log", xlabel="pretraining compute (FLOPs, counted)", ylabel="25-shot linear accuracy",
           title="Few-shot accuracy against pretraining compute")  # fmt: skip
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "fewshot_vs_compute.png", dpi=150)
    plt.close(fig)


def run_command(argv=None) -> list[dict]:
    p = make_parser("ssvit-compare", __doc__, config=True)
    p.add_class_arguments(Study)
    ns = parse_args(p, argv)
    study = Study(**{k: v for k, v in vars(ns).items() if k in Study.__dataclass_fields__})
    study.budgets = study.budgets or []
    if study.semi is not None:
        check_semi(study)
    elif study.semi_after_finetune is not None:
        raise UsageError("semi_after_finetune: Semi-ViT's order needs semi (the semi-supervised fine-tuning that follows the "
                         "supervised one): add semi, or remove semi_after_finetune.")  # fmt: skip
    if study.joint is not None and not study.budgets:
        raise UsageError("joint: the joint-training arm is part of budget studies: add budgets (e.g. [16384]), or remove joint.")
    if study.lsq and not study.budgets:
        raise UsageError("lsq: the closed-form read-out is part of budget studies: add budgets (e.g. [16384]), or remove lsq.")
    if study.lsq and "lsq" in study.readouts:
        raise UsageError("readouts: lsq is the closed-form read-out's name (Study.lsq); give that fine-tuning read-out another name.")
    rows = run_budget_study(study) if study.budgets else run_study(study)
    main_process_only(print)((Path(study.output_dir) / "results.md").read_text())
    return rows


main = command("ssvit-compare")(run_command)


if __name__ == "__main__":
    main()
