"""Supervised versus self-supervised: run the ViT paper's comparison as one resumable study and report it.

    accelerate launch ssvit/compare.py --config configs/compare_cifar10_cpu.yaml

Arms: from scratch, supervised-pretrained (all training labels), masked-patch-pretrained (the same images,
no labels), each fine-tuned with the same backbone, data, augmentation and fine-tuning budget at every label
fraction and seed. Ablations (corruption rate, targets) are extra masked-patch pretrainings compared by
few-shot accuracy. Every run is an ordinary ssvit run in <output_dir>/runs/<name>: a finished run (its
results.json exists) is never run again, an interrupted one resumes from its last checkpoint.
Writes results.csv, results.md (mean and 95% confidence interval over seeds) and two PNG plots.
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

from ssvit.config import parse, preset, saved_config, saved_train_config


@dataclass
class Study:
    """A comparison study (configs/compare_*.yaml). Every mapping holds ssvit flags without the dashes."""

    output_dir: str
    base: dict = field(default_factory=dict)
    """Flags shared by every run: model, data, img_size, precision..."""
    pretrain: dict = field(default_factory=dict)
    """Flags of both pretrainings (steps, batch, lr)."""
    masked_patch: dict = field(default_factory=dict)
    """Extra flags of the masked-patch pretraining (lr, corruption...)."""
    supervised: dict = field(default_factory=dict)
    """Extra flags of the supervised pretraining."""
    finetune: dict = field(default_factory=dict)
    """Fine-tuning flags, the same for every arm."""
    label_fractions: list = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    ablations: dict = field(default_factory=dict)
    """name -> masked_patch flags, e.g. {mask_ratio_0.15: {masked_patch.mask_ratio: 0.15}}."""


ARMS = ("scratch", "supervised", "masked_patch")


def flags(mapping: dict) -> list[str]:
    out = []
    for key, value in mapping.items():
        out += [f"--{key}", value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()]
    return [a.removesuffix("\n...") for a in out]


def run_once(argv: list[str], output_dir: Path, defaults: Optional[dict] = None) -> dict:
    """An ssvit run that is skipped when finished and resumed when interrupted."""
    from ssvit.train import train

    done = output_dir / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    run = parse([*argv, "--output_dir", str(output_dir), "--resume", "auto"], defaults=defaults)
    return train(run)


def pretraining_flops(run_dir: Path) -> float:
    """FLOPs of the whole pretraining: one training step counted with FlopCounterMode, times the steps."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ssvit.train import build_objective

    saved = saved_config(run_dir)
    run = parse(["--config", str(run_dir / "config.yaml")])
    model = build_objective(run, num_classes=10)
    images = torch.rand(saved["batch_size"], 3, saved["img_size"], saved["img_size"])
    with FlopCounterMode(display=False) as counter:
        model(images, torch.zeros(len(images), dtype=torch.long)).loss.backward()
    return counter.get_total_flops() * saved["max_steps"]


# Two-sided 95% quantiles of Student's t by degrees of freedom (seeds - 1); the normal 1.96 beyond.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def confidence_interval(values: list[float]) -> float:
    """Half-width of the 95% confidence interval of the mean over seeds (Student's t)."""
    if len(values) < 2:
        return float("nan")
    return T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def top1_by_seed(rows: list[dict], arm: str, fraction: float) -> dict:
    return {r["seed"]: r["top1"] for r in rows if r["kind"] == "finetune" and r["arm"] == arm and r["label_fraction"] == fraction}


def paired_difference(arm: dict, scratch: dict) -> Optional[tuple[float, float]]:
    """Mean and 95% interval of (arm - scratch) over the seeds both ran. A seed fixes the label subset and the
    data order for every arm, so pairing removes that share of the spread from the comparison."""
    diffs = [arm[s] - scratch[s] for s in arm if s in scratch]
    return (statistics.mean(diffs), confidence_interval(diffs)) if len(diffs) >= 2 else None


def run_study(study: Study) -> list[dict]:
    from ssvit.data import load_splits
    from ssvit.evaluate import evaluate_backbone, representation_for
    from ssvit.models import build_timm_model

    root = Path(study.output_dir)
    base = flags(study.base)
    pretrained = {}
    for name, extra in {"supervised": study.supervised, "masked_patch": study.masked_patch,
                        **{f"masked_patch_{k}": {**study.masked_patch, **v} for k, v in study.ablations.items()}}.items():  # fmt: skip
        objective = "supervised" if name == "supervised" else "masked_patch"
        result = run_once([*base, "--objective", objective, *flags({**study.pretrain, **extra})], root / "runs" / f"pretrain_{name}")
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

    for arm in ARMS:
        for fraction in study.label_fractions:
            for seed in study.seeds:
                name = f"finetune_{arm}_frac{fraction}_seed{seed}"
                init = [] if arm == "scratch" else ["--init", str(pretrained[arm])]
                argv = [*base, *init, *flags(study.finetune), "--label_fraction", str(fraction), "--seed", str(seed),
                        "--fewshot_steps", "0"]  # the label subset and the initialisation vary with the seed
                result = run_once(argv, root / "runs" / name, defaults=preset("finetune"))
                rows.append({"kind": "finetune", "arm": arm, "label_fraction": fraction, "seed": seed,
                             "pretrain_flops": next((r["pretrain_flops"] for r in rows if r["arm"] == arm), 0.0),
                             "top1": result["val/top1"], "top5": result.get("val/top5")})  # fmt: skip
    write_report(rows, root)
    return rows


def write_report(rows: list[dict], root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k in r})
    with (root / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)

    lines = ["| arm | label fraction | fine-tune top-1 (mean ± 95% CI) | minus scratch, paired by seed (mean ± 95% CI) | seeds |",
             "|---|---|---|---|---|"]  # fmt: skip
    fractions = sorted({r["label_fraction"] for r in rows if r["kind"] == "finetune"})
    series = {}
    for arm in ARMS:
        for fraction in fractions:
            top1 = top1_by_seed(rows, arm, fraction)
            if top1:
                mean, ci = statistics.mean(top1.values()), confidence_interval(list(top1.values()))
                series.setdefault(arm, []).append((fraction, mean, ci))
                gain = paired_difference(top1, top1_by_seed(rows, "scratch", fraction)) if arm != "scratch" else None
                gain = f"{gain[0]:+.2%} ± {gain[1]:.2%}" if gain else ""
                lines.append(f"| {arm} | {fraction:g} | {mean:.2%} ± {ci:.2%} | {gain} | {len(top1)} |")
    lines += ["", "| pretraining | pretraining FLOPs | 1-shot | 5-shot | 10-shot | 25-shot |", "|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "fewshot"):
        shots = " | ".join(f"{r.get(f'fewshot_{n}shot', float('nan')):.2%}" for n in (1, 5, 10, 25))
        lines.append(f"| {r['arm']} | {r['pretrain_flops']:.3g} | {shots} |")
    (root / "results.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(5, 4))
    for arm, points in series.items():
        xs, ys, cis = zip(*points)
        ax.errorbar(xs, ys, yerr=cis, marker="o", capsize=3, label=arm)
    ax.set(xscale="log", xlabel="fraction of training labels", ylabel="validation top-1", title="Fine-tuning accuracy")
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
    from jsonargparse import ArgumentParser, ActionConfigFile

    p = ArgumentParser(prog="ssvit-compare", description=__doc__.splitlines()[0])
    p.add_argument("--config", action=ActionConfigFile)
    p.add_class_arguments(Study)
    ns = p.parse_args(argv)
    study = Study(**{k: v for k, v in vars(ns).items() if k in Study.__dataclass_fields__})
    rows = run_study(study)
    print((Path(study.output_dir) / "results.md").read_text())
    return rows


def main(argv=None):
    from ssvit.errors import user_errors

    with user_errors("ssvit-compare", cli=argv is None):
        return run_command(argv)


if __name__ == "__main__":
    main()
