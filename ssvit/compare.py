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
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from ssvit.config import parse, preset, saved_train_config
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
    """Which arms run: scratch, scratch_matched, supervised and the objectives' names (unset: all of them)."""
    budgets: list = field(default_factory=list)
    """Compute on the x-axis: budgets in images of fine-tuning from scratch; every arm of a budget spends the same
    training FLOPs (counted per image of each objective with FlopCounterMode). When given, the study runs scratch and
    every objective at each budget instead of the arms (run_budget_study)."""
    pretrain_shares: list = field(default_factory=lambda: [0.5, 0.75])
    """With budgets: the shares of a budget's FLOPs that an objective spends on pretraining, the rest on fine-tuning."""

    def arm_names(self) -> list[str]:
        """scratch: fine-tuning's budget only. scratch_matched: from scratch on the labelled subset for as many
        images as the first objective's pretraining plus fine-tuning process (label fractions below 1; at 1 the
        supervised arm is that). supervised and each objective: pretrained on all training images (with / without
        labels), then fine-tuned."""
        every = ["scratch", "scratch_matched", "supervised", *self.objectives]
        return [a for a in every if self.arms is None or a in self.arms]

    def pretraining_flags(self, arm: str) -> dict:
        return self.supervised if arm == "supervised" else self.objectives[arm]


def resolved(study: Study, arm: str) -> tuple[dict, dict]:
    """(pretraining flags, fine-tuning flags) of an arm as its runs see them: defaults, base, then the study's."""
    from ssvit.config import TrainConfig

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
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k != "resume")
        if changed:
            diff = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in changed[:5])
            raise UsageError(f"{output_dir} was made with other settings ({diff}). The study reuses finished runs by "
                             f"name: delete that folder to run it with the new settings, or give the study another output_dir.")  # fmt: skip
    done = output_dir / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    return train(run)


def flops_per_image(run_dir: Path) -> float:
    """FLOPs of one training image (forward and backward) of a run's objective, counted with FlopCounterMode."""
    return counted_flops(["--config", str(run_dir / "config.yaml")])


def counted_flops(argv: list[str], defaults: Optional[dict] = None) -> float:
    """FLOPs of one training image (forward and backward) of the run `argv` describes, before it runs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ssvit.train import build_objective

    run = parse([*argv, "--init", "null"], defaults=defaults)  # the architecture, not the weights
    model = build_objective(run, num_classes=10)
    views = type(model).views(run.train, run.objective_options)  # a multi-crop objective pays for every crop
    images = views.example(2) if views else torch.rand(2, 3, run.train.img_size, run.train.img_size)
    with FlopCounterMode(display=False) as counter:
        model(images, torch.zeros(2, dtype=torch.long)).loss.backward()
    return counter.get_total_flops() / 2


def pretraining_flops(run_dir: Path) -> float:
    """FLOPs of the whole pretraining: FLOPs per image times the images it processed."""
    saved = saved_config(run_dir)
    return flops_per_image(run_dir) * saved["max_steps"] * saved["batch_size"] * saved["gradient_accumulation_steps"]


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
    """One cell of a budget study: an arm (scratch, or an objective at a pretraining share) at a budget."""

    arm: str
    objective: Optional[str]
    share: float
    budget: int
    pretrain_images: int
    finetune_images: int


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
    return cells


def budget_pretrainings(study: Study, plan: list[Cell]) -> dict[tuple[str, int], str]:
    """(objective, pretraining images) -> checkpoint: one pretraining per objective and size, shared by seeds and
    label fractions."""
    checkpoints = {}
    for cell in plan:
        key = (cell.objective, cell.pretrain_images)
        if cell.objective and key not in checkpoints:
            pretrain, _ = resolved(study, cell.objective)
            argv = pretraining_argv(study, cell.objective, cell.pretrain_images // pretrain["batch_size"])
            checkpoints[key] = run_once(argv, Path(study.output_dir) / "runs" / f"pretrain_{cell.objective}_{cell.pretrain_images}")["checkpoint"]
    return checkpoints


def run_budget_study(study: Study) -> list[dict]:
    """Compute on the x-axis (the paper's Figure 5 is the model): scratch and every objective at the same total
    training FLOPs, each objective splitting each budget between pretraining and fine-tuning in one or more ways.
    The report pairs each cell by seed with scratch at the same budget and, where the grid has it, scratch with the
    same fine-tuning images."""
    root = Path(study.output_dir)
    plan = budget_plan(study)
    _, finetune = resolved(study, first_objective(study))
    checkpoints = budget_pretrainings(study, plan)
    flops = {}
    rows = []
    for seed in study.seeds:  # seed by seed, so that a partial study already has whole curves
        for fraction in study.label_fractions:
            for cell in plan:
                pre, fine = cell.pretrain_images, cell.finetune_images
                init = ["--init", checkpoints[(cell.objective, pre)]] if cell.objective else []
                argv = [*flags(study.base), *init, *flags(with_steps(study.finetune, finetune, fine // finetune["batch_size"])),
                        "--label_fraction", str(fraction), "--seed", str(seed), "--fewshot_steps", "0"]  # fmt: skip
                run_dir = root / "runs" / f"finetune_{cell.arm}_images{pre + fine}_frac{fraction}_seed{seed}"
                result = run_once(argv, run_dir, defaults=preset("finetune"))
                pretrained = root / "runs" / f"pretrain_{cell.objective}_{pre}"
                for key, folder in (("finetune", run_dir), (cell.objective, pretrained)):
                    if key and key not in flops and folder.exists():
                        flops[key] = flops_per_image(folder)
                rows.append({"kind": "budget", "arm": cell.arm, "objective": cell.objective or "", "share": cell.share,
                             "budget": cell.budget, "label_fraction": fraction, "seed": seed, "images": pre + fine,
                             "pretrain_images": pre, "finetune_images": fine,
                             "flops": fine * flops["finetune"] + (pre * flops[cell.objective] if cell.objective else 0),
                             "top1": result.get("test/top1", result["val/top1"]), "val_top1": result["val/top1"],
                             "split": "test" if "test/top1" in result else "val"})  # fmt: skip
                write_budget_report(rows, root)
    return rows


def run_study(study: Study) -> list[dict]:
    from ssvit.data import load_splits
    from ssvit.features import evaluate_backbone, representation_for
    from ssvit.models import build_timm_model

    root = Path(study.output_dir)
    first = first_objective(study)
    pretrained = {}
    # name -> (objective, its extra flags): the arms' pretrainings, then the ablations of the first objective.
    pretrainings = {name: (name, {}) for name in ("supervised", *study.objectives) if name in study.arm_names()}
    pretrainings |= {f"{first}_{k}": (first, v) for k, v in study.ablations.items()}
    for name, (objective, extra) in pretrainings.items():
        result = run_once(pretraining_argv(study, objective, extra=extra), root / "runs" / f"pretrain_{name}")
        pretrained[name] = Path(result["checkpoint"])

    rows = []
    for name, ckpt in pretrained.items():  # few-shot accuracy of each pretrained backbone (frozen)
        done = ckpt.parents[1] / "study_fewshot.json"  # like a run: computed once, read by later invocations
        if not done.exists():
            cfg = saved_train_config(ckpt)
            backbone, _ = build_timm_model(ckpt)
            few = evaluate_backbone(backbone, load_splits(cfg), representation_for(cfg.objective, "auto"), probe=False, max_train=5000)
            row = {"kind": "fewshot", "arm": name, "label_fraction": "", "seed": "",
                   "pretrain_flops": pretraining_flops(ckpt.parents[1]), **{k: v for k, v in few.items() if k.startswith("fewshot")}}  # fmt: skip
            done.write_text(json.dumps(row, indent=2) + "\n")
        rows.append(json.loads(done.read_text()))

    for arm in study.arm_names():
        for fraction in study.label_fractions:
            if arm == "scratch_matched" and fraction >= 1:
                continue  # with all labels, the supervised arm is scratch with the same compute
            for seed in study.seeds:
                rows.append(finetune_row(study, arm, fraction, seed, pretrained, rows))
    write_report(rows, root, study.arm_names())
    return rows


def finetune_row(study: Study, arm: str, fraction: float, seed: int, pretrained: dict, rows: list[dict]) -> dict:
    """Fine-tune one cell (a finished run is read back) and report it: test top-1, validation beside it, and the
    images the arm processed in all (pretraining included)."""
    init = [] if arm.startswith("scratch") else ["--init", str(pretrained[arm])]
    argv = [*flags(study.base), *init, *flags(finetune_flags(study, arm)), "--label_fraction", str(fraction), "--seed", str(seed),
            "--fewshot_steps", "0"]  # the label subset and the initialisation vary with the seed
    result = run_once(argv, Path(study.output_dir) / "runs" / f"finetune_{arm}_frac{fraction}_seed{seed}", defaults=preset("finetune"))
    return {"kind": "finetune", "arm": arm, "label_fraction": fraction, "seed": seed,
            "pretrain_flops": next((r["pretrain_flops"] for r in rows if r["arm"] == arm), 0.0),
            "images": images_processed(study, arm),
            "top1": result.get("test/top1", result["val/top1"]), "val_top1": result["val/top1"],
            "split": "test" if "test/top1" in result else "val", "top5": result.get("test/top5", result.get("val/top5"))}  # fmt: skip


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)


def write_budget_report(rows: list[dict], root: Path) -> None:
    """results.csv, results.md (every cell: mean ± 95% CI over seeds, gains paired by seed) and
    accuracy_vs_compute.png (top-1 against total training FLOPs, one panel per label fraction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_csv(rows, root / "results.csv")
    split = rows[0]["split"]
    by = lambda arm, fraction, budget, key="top1": {r["seed"]: r[key] for r in rows  # noqa: E731
                                                    if (r["arm"], r["label_fraction"], r["budget"]) == (arm, fraction, budget)}  # fmt: skip
    lines = [f"Fine-tuning top-1 on the {split} split (validation beside it), mean ± 95% CI over seeds; gains paired by seed "
             f"against scratch at the same budget (the same training FLOPs), and with the same fine-tuning images where the "
             f"grid has it.", "",
             f"| arm | label fraction | budget | pretraining + fine-tuning images | total FLOPs | {split} top-1 "
             f"| validation top-1 | minus scratch (same FLOPs) | minus scratch (same fine-tuning images) | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    cells = {(r["arm"], r["label_fraction"], r["budget"]): r for r in rows}
    fractions = sorted({c[1] for c in cells})
    fig, axes = plt.subplots(1, len(fractions), figsize=(5 * len(fractions), 4), squeeze=False)
    panels = dict(zip(fractions, axes[0]))
    curves = {}
    for (arm, fraction, budget), r in sorted(cells.items(), key=lambda c: (c[0][1], c[0][0] != "scratch", c[0][0], c[0][2])):
        top1 = by(arm, fraction, budget)
        mean, ci = statistics.mean(top1.values()), confidence_interval(list(top1.values()))
        flops = statistics.mean(x["flops"] for x in rows if (x["arm"], x["label_fraction"], x["budget"]) == (arm, fraction, budget))
        fine = r["finetune_images"]
        gains = [paired_difference(top1, by("scratch", fraction, ref)) if arm != "scratch" else None for ref in (budget, fine)]
        gains = [f"{g[0]:+.2%} ± {g[1]:.2%}" if g else "" for g in gains]
        spread = "" if math.isnan(ci) else f" ± {ci:.2%}"  # one seed has no interval
        lines.append(f"| {arm} | {fraction:g} | {budget:,} | {r['pretrain_images']:,} + {fine:,} | {flops:.3g} | {mean:.2%}{spread} | "
                     f"{statistics.mean(by(arm, fraction, budget, 'val_top1').values()):.2%} | {gains[0]} | {gains[1]} | {len(top1)} |")  # fmt: skip
        label = arm if not r["objective"] else f"{r['objective']}, {r['share']:.0%} of the budget pretraining"
        curves.setdefault((label, fraction), []).append((flops, mean, 0 if math.isnan(ci) else ci))
    for (label, fraction), points in curves.items():
        xs, ys, cis = zip(*points)
        panels[fraction].errorbar(xs, ys, yerr=cis, marker="o", capsize=3, label=label)
    for fraction, ax in panels.items():
        ax.set(xscale="log", xlabel="total training compute (FLOPs, pretraining + fine-tuning)", ylabel=f"{split} top-1",
               title=f"{fraction:.0%} of the labels")  # fmt: skip
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "accuracy_vs_compute.png", dpi=150)
    plt.close(fig)
    (root / "results.md").write_text("\n".join(lines) + "\n")


def write_report(rows: list[dict], root: Path, arms: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_csv(rows, root / "results.csv")

    split = next((r["split"] for r in rows if r["kind"] == "finetune"), "val")
    lines = [f"Fine-tuning top-1 on the {split} split (validation beside it), mean ± 95% CI over seeds; gains paired by seed.", "",
             f"| arm | label fraction | images processed | {split} top-1 | validation top-1 | minus scratch (fine-tuning budget) "
             f"| minus scratch (same images) | seeds |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
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
    lines += ["", "| pretraining | pretraining FLOPs | 1-shot | 5-shot | 10-shot | 25-shot |", "|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "fewshot"):
        shots = " | ".join(f"{r.get(f'fewshot_{n}shot', float('nan')):.2%}" for n in (1, 5, 10, 25))
        lines.append(f"| {r['arm']} | {r['pretrain_flops']:.3g} | {shots} |")
    (root / "results.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(5, 4))
    for arm, points in series.items():
        xs, ys, cis = zip(*points)
        ax.errorbar(xs, ys, yerr=cis, marker="o", capsize=3, label=arm)
    ax.set(xscale="log", xlabel="fraction of training labels", ylabel=f"{split} top-1", title="Fine-tuning accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(root / "accuracy_vs_labels.png", dpi=150)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for r in (r for r in rows if r["kind"] == "fewshot"):
        ax.scatter(r["pretrain_flops"], r.get("fewshot_25shot", float("nan")), label=r["arm"])
    ax.set(xscale="log", xlabel="pretraining compute (FLOPs, counted)", ylabel="25-shot linear accuracy",
           title="Few-shot accuracy against pretraining compute")  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "fewshot_vs_compute.png", dpi=150)
    plt.close(fig)


def run_command(argv=None) -> list[dict]:
    p = make_parser("ssvit-compare", __doc__, config=True)
    p.add_class_arguments(Study)
    ns = parse_args(p, argv)
    study = Study(**{k: v for k, v in vars(ns).items() if k in Study.__dataclass_fields__})
    rows = run_budget_study(study) if study.budgets else run_study(study)
    print((Path(study.output_dir) / "results.md").read_text())
    return rows


main = command("ssvit-compare")(run_command)


if __name__ == "__main__":
    main()
