"""The comparison study end to end on a tiny configuration: files written, finished cells never rerun."""

import csv
import json
from dataclasses import replace
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file
import yaml

from ssvit.compare import budget_summary, confidence_interval, flops_per_image, main, paired_difference, run_once, saturation
from ssvit.errors import UsageError

from conftest import TINY_VIT, tiny_args


def test_tiny_study_writes_table_and_plots_and_skips_finished_cells(tmp_path):
    model_kwargs = yaml.safe_load(TINY_VIT[TINY_VIT.index("--model_kwargs") + 1])
    study = {
        "output_dir": str(tmp_path / "study"),
        "base": {"model": "vit_tiny_patch16_224", "model_kwargs": model_kwargs, "img_size": 16, "data": "synthetic:400",
                 "mixed_precision": "no", "report_to": [], "cpu_threads": 1, "batch_size": 16, "eval_batches": 1,
                 "test_fraction": 0.1},
        "pretrain": {"max_steps": 2, "warmup_steps": 1},
        "finetune": {"max_steps": 2, "warmup_steps": 1},
        "label_fractions": [0.5, 1.0],
        "seeds": [0, 1],
        "ablations": {"mask_ratio_0.15": {"masked_patch.mask_ratio": 0.15}},
    }  # fmt: skip
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    rows = main(["--config", str(config)])
    root = tmp_path / "study"
    for name in ("results.csv", "results.md", "accuracy_vs_labels.png", "fewshot_vs_compute.png"):
        assert (root / name).stat().st_size > 0, name
    finetunes = [r for r in rows if r["kind"] == "finetune"]
    assert len(finetunes) == (4 * 2 - 1) * 2  # 4 arms x 2 fractions (no matched scratch at 100%) x 2 seeds
    assert {r["split"] for r in finetunes} == {"test"}  # reported on the test split, validation beside it
    assert all(0 <= r["top1"] <= 1 and 0 <= r["val_top1"] <= 1 for r in finetunes)
    matched = json.loads((root / "runs/finetune_scratch_matched_frac0.5_seed0/results.json").read_text())
    assert matched["steps"] == 2 + 2 * 16 // 16  # as many images as masked-patch pretraining plus fine-tuning
    assert {r["images"] for r in finetunes if r["arm"] in ("scratch_matched", "masked_patch")} == {4 * 16}
    frozen = {r["arm"]: r for r in rows if r["kind"] == "frozen"}
    assert set(frozen) == {"random weights", "supervised", "masked_patch", "masked_patch_mask_ratio_0.15"}
    assert {r["split"] for r in frozen.values()} == {"test"}  # frozen features are read on the test split too
    for name, r in frozen.items():
        assert (r["pretrain_flops"] > 0) == (name != "random weights") and r["pretrain_images"] == (0 if name == "random weights" else 32)
        assert all(0 <= r[k] <= 1 for k in ("fewshot_5shot", "linear_probe", "knn20_weighted"))
    assert frozen["masked_patch"]["representation"] == "mean" and frozen["supervised"]["representation"] == "prelogits"
    assert len(list(csv.DictReader((root / "results.csv").open()))) == len(rows)
    report = (root / "results.md").read_text()
    assert "test top-1" in report and "minus scratch (same images)" in report and "| random weights | 0 | 0 | mean |" in report
    # A second invocation reuses every finished run.
    stamps = {p: p.stat().st_mtime_ns for p in [*root.glob("runs/*/results.json"), *root.glob("runs/*/study_frozen.json")]}
    assert len(stamps) == (4 * 2 - 1) * 2 + 3 + 3 + 1  # fine-tunings, pretrainings, their frozen features, random weights
    again = main(["--config", str(config)])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again == rows
    assert [r["top1"] for r in again if r["kind"] == "finetune"] == [r["top1"] for r in finetunes]
    assert json.loads((root / "runs/finetune_scratch_frac0.5_seed1/results.json").read_text())["steps"] == 2


def test_confidence_interval_uses_students_t():
    assert abs(confidence_interval([1.0, 2.0, 3.0]) - 4.303 * 1.0 / 3**0.5) < 1e-9


def test_paired_difference_pairs_seeds_and_ignores_unmatched_ones():
    scratch = {0: 0.30, 1: 0.40, 2: 0.35}
    arm = {0: 0.35, 1: 0.45, 2: 0.40, 3: 0.90}  # a constant +5 points on the shared seeds; seed 3 has no partner
    mean, ci = paired_difference(arm, scratch)
    assert abs(mean - 0.05) < 1e-12 and ci < 1e-12  # the seeds' own spread (10 points) cancels out
    assert paired_difference({0: 0.5}, scratch) is None  # one pair gives no interval


def test_budget_study_runs_every_cell_at_its_total_and_pairs_gains(tmp_path):
    """Compute on the x-axis: scratch and masked patch at the same totals of images, the split checked up front."""
    model_kwargs = yaml.safe_load(TINY_VIT[TINY_VIT.index("--model_kwargs") + 1])
    study = {
        "output_dir": str(tmp_path / "study"),
        "base": {"model": "vit_tiny_patch16_224", "model_kwargs": model_kwargs, "img_size": 16, "data": "synthetic:300",
                 "mixed_precision": "no", "report_to": [], "cpu_threads": 1, "eval_batches": 1, "test_fraction": 0.1},
        "pretrain": {"batch_size": 8, "max_steps": 10, "warmup_steps": 2},
        "finetune": {"batch_size": 8, "max_steps": 10, "warmup_steps": 2},
        "label_fractions": [0.5],
        "seeds": [0, 1],
        "budgets": [32, 64],
        "pretrain_shares": [0.5],
        "objectives": {"masked_patch": {}, "mae": {"adam_beta2": 0.95, "mae.decoder_embed_dim": 16, "mae.decoder_num_heads": 2}},
    }  # fmt: skip
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    everything = main(["--config", str(config)])
    root = tmp_path / "study"
    rows = [r for r in everything if r["kind"] == "budget"]
    assert len(rows) == 2 * (1 + 2) * 2  # budgets x (scratch + 2 objectives x 1 share) x seeds
    # Budget by budget, smallest first: an interrupted study has whole curves up to where it reached.
    assert [r["budget"] for r in rows] == sorted(r["budget"] for r in rows)
    # Every pretraining's frozen features once, beside random weights, on the test split.
    frozen = [r for r in everything if r["kind"] == "frozen"]
    sizes = {(r["objective"], r["pretrain_images"]) for r in rows if r["objective"]}
    assert sorted((r["arm"], r["pretrain_images"]) for r in frozen) == sorted([("random weights", 0), *sizes])
    assert {r["split"] for r in frozen} == {"test"}
    for r in rows:
        assert r["pretrain_images"] + r["finetune_images"] == r["images"] and r["split"] == "test"
        steps = json.loads((root / f"runs/finetune_{r['arm']}_images{r['images']}_frac0.5_seed{r['seed']}/results.json").read_text())["steps"]
        assert steps == r["finetune_images"] // 8
    # Budgets are matched in FLOPs: an objective's pretraining gets the share of scratch's fine-tuning FLOPs, in
    # whole batches of its own images (MAE's encoder sees a quarter of the tokens: more images for the same FLOPs).
    per_image = {o: flops_per_image(root / f"runs/pretrain_{o}_{next(r['pretrain_images'] for r in rows if r['objective'] == o)}")
                 for o in ("masked_patch", "mae")}  # fmt: skip
    scratch = {r["budget"]: r["flops"] for r in rows if r["arm"] == "scratch"}
    for r in (r for r in rows if r["objective"]):
        assert r["pretrain_images"] == 8 * round(r["share"] * scratch[r["budget"]] / per_image[r["objective"]] / 8)
        assert abs(r["flops"] - scratch[r["budget"]]) <= 4 * per_image[r["objective"]] * (1 + 1e-9)  # within half a batch
    assert max(r["pretrain_images"] for r in rows if r["objective"] == "mae") > max(r["pretrain_images"] for r in rows if r["objective"] == "masked_patch")
    pretrain = root / f"runs/pretrain_masked_patch_{max(r['pretrain_images'] for r in rows if r['objective'] == 'masked_patch')}"
    steps = yaml.safe_load((pretrain / "config.yaml").read_text())["max_steps"]
    assert yaml.safe_load((pretrain / "config.yaml").read_text())["warmup_steps"] == round(2 * steps / 10)  # the warmup's share
    assert yaml.safe_load((root / f"runs/pretrain_mae_{max(r['pretrain_images'] for r in rows if r['objective'] == 'mae')}/config.yaml").read_text())["adam_beta2"] == 0.95
    # FLOPs are counted per image of each objective: twice the images, twice the FLOPs.
    assert scratch[64] == 2 * scratch[32] > 0
    assert all(r["flops"] > 0 for r in rows)
    report = (root / "results.md").read_text()
    assert "minus scratch (same FLOPs)" in report and "ahead of scratch from budget" in report and "weighted 20-NN" in report
    assert "0.5 of the labels scratch" in report
    line = next(l for l in report.splitlines() if l.startswith("| masked_patch0.5 | 0.5 | 64 |"))
    assert line.split("|")[-3].strip()  # same fine-tuning images (32) is in the grid: a paired gain is reported
    assert (root / "accuracy_vs_compute.png").stat().st_size > 0
    assert len(list(csv.DictReader((root / "results.csv").open()))) == len(everything)
    # A changed recipe does not silently reuse the finished runs made with the old one.
    config.write_text(yaml.safe_dump({**study, "finetune": {**study["finetune"], "lr": 0.5}}))
    with pytest.raises(UsageError, match=r"was made with other settings \(lr: 0\.01 there, 0\.5 now\)"):
        main(["--config", str(config)])


def budget_rows(curves: dict, val: Optional[dict] = None) -> list[dict]:
    """Rows of a budget study: arm -> {budget: [top-1 of seed 0, seed 1, ...]}."""
    return [{"kind": "budget", "arm": arm, "objective": "" if arm == "scratch" else arm.rstrip("0123456789."),
             "family": "scratch" if arm == "scratch" else arm.rstrip("0123456789."),
             "share": 0.0 if arm == "scratch" else float(arm[len(arm.rstrip("0123456789.")):]), "label_fraction": 0.1,
             "budget": budget, "seed": seed, "top1": top1, "val_top1": (val or {}).get(arm, {}).get(budget, [top1] * 9)[seed]}
            for arm, curve in curves.items() for budget, accs in curve.items() for seed, top1 in enumerate(accs)]  # fmt: skip


def test_saturation_is_the_first_budget_from_which_a_doubling_gains_under_one_point():
    assert saturation({1: 0.30, 2: 0.34, 4: 0.36, 8: 0.365, 16: 0.37}) == 4
    assert saturation({1: 0.30, 4: 0.325, 16: 0.35}) is None  # 1.25 points per doubling, over two doublings each
    assert saturation({1: 0.30, 4: 0.315, 16: 0.32}) == 1


def test_budget_summary_names_where_an_objective_stays_ahead_and_reads_each_objective_at_its_best_share():
    scratch = {1: [0.30, 0.31], 2: [0.35, 0.36], 4: [0.40, 0.41], 8: [0.42, 0.43]}
    rows = budget_rows({
        "scratch": scratch,
        "mpp0.5": {1: [0.32, 0.33], 2: [0.34, 0.35], 4: [0.42, 0.44], 8: [0.45, 0.46]},  # ahead at 1, behind at 2, ahead from 4
        "mpp0.75": {1: [0.10, 0.10], 2: [0.10, 0.10], 4: [0.10, 0.10], 8: [0.60, 0.62]},  # best on test at 8, worst on validation
        "mae0.5": {1: [0.20, 0.21], 2: [0.25, 0.26], 4: [0.30, 0.31], 8: [0.32, 0.33]},  # always behind
    }, val={"mpp0.75": {b: [0.0, 0.0] for b in scratch}})  # fmt: skip
    lines = [line for line in budget_summary(rows) if line.startswith("| 0.1 |")]
    mpp, mae = (next(line for line in lines if f"| {name} |" in line) for name in ("mpp", "mae"))
    # ahead from budget 4 (not 1: it falls behind at 2); at 8 the share best on validation (50%), not the 75% cell
    assert mpp.split("|")[3:7] == [" 4 ", " 8 ", " 50% ", " +3.00% ± 0.00% (excludes zero) "]
    assert mae.split("|")[3].strip() == "not within the range"
    notes = " ".join(budget_summary(rows))
    assert "not saturated within the range: +2.00% per doubling between its two largest budgets (4 and 8)" in notes


def test_semi_supervised_arms_fine_tune_on_what_the_same_flops_buy():
    """With `semi`, every cell also fine-tunes semi-supervised (from scratch: arm semi; after each pretraining:
    <arm>+semi) on the labelled images that fine-tuning's FLOPs buy at its own cost per labelled image (unlabeled images
    and the teacher's forward counted), in whole batches; planned before any run."""
    from ssvit.compare import Study, budget_plan, counted_flops, flags, semi_argv
    from ssvit.config import preset

    model_kwargs = yaml.safe_load(TINY_VIT[TINY_VIT.index("--model_kwargs") + 1])
    study = Study(output_dir="unused", budgets=[512, 1024], pretrain_shares=[0.5], objectives={"mae": {"mae.decoder_embed_dim": 16, "mae.decoder_num_heads": 2}},
                  base={"model": "vit_tiny_patch16_224", "model_kwargs": model_kwargs, "img_size": 16, "data": "synthetic:300"},
                  pretrain={"batch_size": 8}, finetune={"batch_size": 8},
                  semi={"objective": "fixmatch", "fixmatch.mu": 2, "fixmatch.teacher": "ema"})  # fmt: skip
    cells = {(c.arm, c.budget): c for c in budget_plan(study)}
    assert {arm for arm, _ in cells} == {"scratch", "mae0.5", "semi", "mae0.5+semi"}
    fine = counted_flops([*flags(study.base), *flags(study.finetune)], defaults=preset("finetune"))
    semi = counted_flops(semi_argv(study), defaults=preset("finetune"))
    assert 3 * fine < semi < 5 * fine  # mu 2: 3 images trained, 2 more through the teacher's forward
    for budget in (512, 1024):
        plain, scratch = cells["mae0.5", budget], cells["scratch", budget]
        assert cells["semi", budget].finetune_images == 8 * round(budget * fine / semi / 8)
        both = cells["mae0.5+semi", budget]
        assert (both.pretrain_images, both.semi, both.family) == (plain.pretrain_images, True, "mae+semi")
        assert both.finetune_images == 8 * round(plain.finetune_images * fine / semi / 8)
        assert (scratch.family, cells["semi", budget].family, plain.family) == ("scratch", "semi", "mae")
    study.budgets = [16]
    with pytest.raises(UsageError, match="budget 16: the semi-supervised fine-tuning of mae0.5 would train on less than one batch of 8"):
        budget_plan(study)


def test_semi_vit_order_fine_tunes_then_continues_semi_supervised_from_that_classifier_at_the_same_flops(tmp_path):
    """With `semi_after_finetune`, each cell also runs Semi-ViT's order: supervised fine-tuning on that share of its
    fine-tuning FLOPs, then semi-supervised fine-tuning initialised from that run's checkpoint on the rest; the row
    counts both runs' FLOPs (the same total as scratch, within a batch) and their labelled images, and the arm is read
    beside semi as another read-out."""
    model_kwargs = yaml.safe_load(TINY_VIT[TINY_VIT.index("--model_kwargs") + 1])
    study = {
        "output_dir": str(tmp_path / "study"),
        "base": {"model": "vit_tiny_patch16_224", "model_kwargs": model_kwargs, "img_size": 16, "data": "synthetic:300",
                 "mixed_precision": "no", "report_to": [], "cpu_threads": 1, "eval_batches": 1},
        "pretrain": {"batch_size": 8, "max_steps": 10, "warmup_steps": 2},
        "finetune": {"batch_size": 8, "max_steps": 10, "warmup_steps": 2},
        "objectives": {"mae": {"mae.decoder_embed_dim": 16, "mae.decoder_num_heads": 2}},
        "label_fractions": [0.5], "seeds": [0], "budgets": [256], "pretrain_shares": [0.5], "frozen": False,
        "semi": {"objective": "fixmatch", "fixmatch.mu": 1, "fixmatch.teacher": "ema"}, "semi_after_finetune": 0.5,
    }  # fmt: skip
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    rows = {r["arm"]: r for r in main(["--config", str(config)])}
    assert set(rows) == {"scratch", "mae0.5", "semi", "mae0.5+semi", "ft+semi", "mae0.5+ft+semi"}
    runs = tmp_path / "study/runs"
    for arm, plain in (("ft+semi", "scratch"), ("mae0.5+ft+semi", "mae0.5")):
        r = rows[arm]
        assert (r["family"], r["readout"]) == (rows[arm.replace("ft+", "")]["family"], "ft first")
        first = next(runs.glob(f"finetune_{arm}_first_images*_frac0.5_seed0"))
        second = runs / f"finetune_{arm}_images{r['images']}_frac0.5_seed0"
        first_config, second_config = (yaml.safe_load((d / "config.yaml").read_text()) for d in (first, second))
        # The first run is plain supervised fine-tuning on half of the plain arm's fine-tuning images ...
        assert first_config["objective"] == "supervised" and first_config["max_steps"] * 8 == rows[plain]["finetune_images"] // 2
        # ... and the semi-supervised one starts from its checkpoint, with the same labelled images (seed and fraction).
        assert second_config["objective"] == "fixmatch"
        assert second_config["init"] == json.loads((first / "results.json").read_text())["checkpoint"]
        assert (second_config["seed"], second_config["label_fraction"]) == (first_config["seed"], first_config["label_fraction"]) == (0, 0.5)
        labelled = first_config["max_steps"] * 8 + second_config["max_steps"] * 8
        assert r["finetune_images"] == labelled and r["images"] == r["pretrain_images"] + labelled
        # Both runs' FLOPs count, to the same total as scratch within half a batch of each run.
        fine, semi = flops_per_image(first), flops_per_image(second)
        pre = flops_per_image(runs / f"pretrain_mae_{r['pretrain_images']}") if r["pretrain_images"] else 0.0
        assert r["flops"] == pytest.approx(first_config["max_steps"] * 8 * fine + second_config["max_steps"] * 8 * semi + r["pretrain_images"] * pre)
        assert abs(r["flops"] - rows["scratch"]["flops"]) <= 4 * (fine + semi) * (1 + 1e-9)
    assert "| mae0.5+ft+semi | 0.5 | 256 |" in (tmp_path / "study/results.md").read_text()
    study["semi_after_finetune"] = 0.01  # no whole batch for the supervised run: refused before any run
    config.write_text(yaml.safe_dump(study))
    with pytest.raises(UsageError, match=r"semi_after_finetune: 0.01 of the .* leaves no whole batch of 8"):
        main(["--config", str(config)])
    del study["semi"]
    config.write_text(yaml.safe_dump({**study, "semi_after_finetune": 0.5}))
    with pytest.raises(UsageError, match="semi_after_finetune: Semi-ViT's order needs semi"):
        main(["--config", str(config)])


def test_the_joint_arm_trains_from_scratch_on_what_the_same_flops_buy():
    """With `joint`, every budget also runs joint training from scratch (arm joint: fine-tuning plus the aux objective
    on unlabeled images), on the labelled images that fine-tuning's FLOPs buy at its own cost per labelled image."""
    from ssvit.compare import Study, budget_plan, counted_flops, flags, joint_argv
    from ssvit.config import preset

    model_kwargs = yaml.safe_load(TINY_VIT[TINY_VIT.index("--model_kwargs") + 1])
    study = Study(output_dir="unused", budgets=[512], pretrain_shares=[0.5], objectives={"mae": {"mae.decoder_embed_dim": 16, "mae.decoder_num_heads": 2}},
                  base={"model": "vit_tiny_patch16_224", "model_kwargs": model_kwargs, "img_size": 16, "data": "synthetic:300"},
                  pretrain={"batch_size": 8}, finetune={"batch_size": 8},
                  joint={"aux": "mae", "aux_ratio": 2, "mae.decoder_embed_dim": 16, "mae.decoder_num_heads": 2})  # fmt: skip
    cells = {c.arm: c for c in budget_plan(study)}
    assert set(cells) == {"scratch", "mae0.5", "joint"}
    fine = counted_flops([*flags(study.base), *flags(study.finetune)], defaults=preset("finetune"))
    joint = counted_flops(joint_argv(study), defaults=preset("finetune"))
    assert fine < joint < 3 * fine  # 2 unlabeled images per labelled one through MAE (a quarter of the tokens each)
    assert cells["joint"].finetune_images == 8 * round(512 * fine / joint / 8) and cells["joint"].pretrain_images == 0
    assert (cells["joint"].family, cells["joint"].objective) == ("joint", None)
    study.joint = {"aux": "supervised"}
    with pytest.raises(UsageError, match="joint training adds a self-supervised objective"):
        budget_plan(study)


def test_read_outs_run_on_every_pretrained_cell_and_the_report_picks_the_best_on_validation(tmp_path):
    """`readouts` read each pretraining other ways (here a linear probe: --freeze_backbone) on the same fine-tuning
    images; the family is read at its best (share, read-out) on validation, which the summary names."""
    from ssvit.compare import Study, budget_plan, budget_summary

    model_kwargs = yaml.safe_load(TINY_VIT[TINY_VIT.index("--model_kwargs") + 1])
    study = Study(output_dir="unused", budgets=[64], pretrain_shares=[0.5], objectives={"mae": {"mae.decoder_embed_dim": 16, "mae.decoder_num_heads": 2}},
                  base={"model": "vit_tiny_patch16_224", "model_kwargs": model_kwargs, "img_size": 16, "data": "synthetic:300"},
                  pretrain={"batch_size": 8}, finetune={"batch_size": 8}, readouts={"probe": {"freeze_backbone": True, "lr": 0.1}})  # fmt: skip
    cells = {c.arm: c for c in budget_plan(study)}
    assert set(cells) == {"scratch", "mae0.5", "mae0.5+probe"}
    probe, plain = cells["mae0.5+probe"], cells["mae0.5"]
    assert (probe.family, probe.readout, probe.finetune_images, probe.pretrain_images) == ("mae", "probe", plain.finetune_images, plain.pretrain_images)

    def row(arm, seed, val, test):
        return {"kind": "budget", "arm": arm, "family": "scratch" if arm == "scratch" else "mae", "share": 0.0 if arm == "scratch" else 0.5,
                "readout": arm.partition("+")[2], "budget": 64, "label_fraction": 0.1, "seed": seed, "val_top1": val, "top1": test}  # fmt: skip

    rows = [row("scratch", s, 0.2, 0.2) for s in (0, 1)] + [row("mae0.5", s, 0.25, 0.3) for s in (0, 1)]
    rows += [row("mae0.5+probe", s, 0.3 + s / 100, 0.4) for s in (0, 1)]  # best on validation: its test gain is the one read
    line = next(r for r in budget_summary(rows) if r.startswith("| 0.1 | mae"))
    assert line.split("|")[5:7] == [" 50% (probe) ", " +20.00% ± 0.00% (excludes zero) "]


def test_the_closed_form_read_out_fits_each_pretraining_on_the_cells_labelled_images_without_training(tmp_path, monkeypatch):
    """lsq: each pretrained cell is also read with no training at all (the ViT paper's least-squares read-out on all
    the cell's labelled images, L2 chosen by leave-one-out on them), scored on test, its FLOPs the pretraining's plus
    a fine-tuning image's per labelled image; computed once, like a run."""
    from ssvit.config import parse
    from ssvit.data import load_splits
    import ssvit.features

    model_kwargs = yaml.safe_load(TINY_VIT[TINY_VIT.index("--model_kwargs") + 1])
    base = {"model": "vit_tiny_patch16_224", "model_kwargs": model_kwargs, "img_size": 16, "data": "synthetic:300",
            "mixed_precision": "no", "report_to": [], "cpu_threads": 1, "eval_batches": 1, "test_fraction": 0.1}  # fmt: skip
    study = {"output_dir": str(tmp_path / "study"), "base": base, "pretrain": {"batch_size": 8, "max_steps": 10},
             "finetune": {"batch_size": 8, "max_steps": 10}, "label_fractions": [0.1], "seeds": [1], "budgets": [64],
             "pretrain_shares": [0.5], "objectives": {"masked_patch": {}}, "frozen": False, "lsq": True}  # fmt: skip
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    rows = {r["arm"]: r for r in main(["--config", str(config)])}
    assert set(rows) == {"scratch", "masked_patch0.5", "masked_patch0.5+lsq"}
    lsq, tuned = rows["masked_patch0.5+lsq"], rows["masked_patch0.5"]
    assert (lsq["family"], lsq["readout"], lsq["split"], lsq["finetune_images"]) == ("masked_patch", "lsq", "test", 0)
    assert 0 <= lsq["top1"] <= 1 and 0 <= lsq["val_top1"] <= 1
    # The fine-tuning runs' labelled images, every one of them and no other.
    labelled = load_splits(parse(["--data", "synthetic:300", "--test_fraction", "0.1", "--label_fraction", "0.1", "--seed", "1"]).train).train
    assert lsq["labelled_images"] == len(labelled) > 0
    root = tmp_path / "study"
    per_image = {k: flops_per_image(root / "runs" / d) for k, d in
                 (("pre", f"pretrain_masked_patch_{lsq['pretrain_images']}"), ("fine", f"finetune_masked_patch0.5_images{tuned['images']}_frac0.1_seed1"))}  # fmt: skip
    assert lsq["pretrain_images"] == tuned["pretrain_images"]
    assert lsq["flops"] == pytest.approx(lsq["pretrain_images"] * per_image["pre"] + len(labelled) * per_image["fine"])
    assert lsq["flops"] < rows["scratch"]["flops"]  # 24 labelled images: less than the fine-tuning it skips
    assert "| masked_patch0.5+lsq | 0.1 | 64 |" in (root / "results.md").read_text()
    # A damaged record (a kill or a full disk mid-write) is measured again, not a traceback.
    done = next(root.glob("runs/finetune_masked_patch0.5+lsq_*/lsq.json"))
    done.write_text(done.read_text()[:20])
    assert {r["arm"]: r for r in main(["--config", str(config)])}["masked_patch0.5+lsq"] == lsq
    # Read back on a second run, not fitted again.
    monkeypatch.setattr(ssvit.features.LsqReadout, "fit", lambda *a, **k: pytest.fail("refitted a finished read-out"))
    again = {r["arm"]: r for r in main(["--config", str(config)])}
    assert again["masked_patch0.5+lsq"] == lsq
    # A read-out of that name among the fine-tuning read-outs would be two arms of one name.
    config.write_text(yaml.safe_dump({**study, "readouts": {"lsq": {"lr": 0.1}}}))
    with pytest.raises(UsageError, match="readouts: lsq is the closed-form read-out's name"):
        main(["--config", str(config)])
    config.write_text(yaml.safe_dump({**study, "budgets": []}))
    with pytest.raises(UsageError, match="lsq: the closed-form read-out is part of budget studies"):
        main(["--config", str(config)])
    # Off as semi and joint are switched off (null), not a parser line about the type of a list.
    with pytest.raises(UsageError, match="lsq: the closed-form read-out is part of budget studies"):
        main(["--config", str(config), "--budgets", "null"])


def test_arms_picks_cells_of_a_budget_study_and_refuses_a_name_it_does_not_have():
    """arms: a part of a budget study's grid (e.g. semi from scratch beside finished cells), by the cells' own names."""
    from ssvit.compare import Study, budget_plan

    model_kwargs = yaml.safe_load(TINY_VIT[TINY_VIT.index("--model_kwargs") + 1])
    study = Study(output_dir="unused", budgets=[64], pretrain_shares=[0.5], objectives={"mae": {"mae.decoder_embed_dim": 16, "mae.decoder_num_heads": 2}},
                  base={"model": "vit_tiny_patch16_224", "model_kwargs": model_kwargs, "img_size": 16, "data": "synthetic:300"},
                  pretrain={"batch_size": 8}, finetune={"batch_size": 8}, readouts={"probe": {"freeze_backbone": True}}, lsq=True)  # fmt: skip
    assert {c.arm for c in budget_plan(study)} == {"scratch", "mae0.5", "mae0.5+probe", "mae0.5+lsq"}
    assert {c.arm for c in budget_plan(replace(study, arms=["scratch", "mae0.5+lsq"]))} == {"scratch", "mae0.5+lsq"}
    with pytest.raises(UsageError, match=r"arms: mae0\.75 is not an arm of this budget study \(its arms: scratch, mae0\.5, "):
        budget_plan(replace(study, arms=["scratch", "mae0.75"]))
    # A fixed-budget study refuses a typo too, rather than running without that arm.
    fixed = Study(output_dir="unused", objectives={"mae": {}}, arms=["scratch", "supervsed"])
    with pytest.raises(UsageError, match=r"arms: supervsed is not an arm of this study \(its arms: scratch, scratch_matched, supervised, mae\)"):
        fixed.arm_names()



def test_arms_that_name_nothing_are_refused_before_any_work(tmp_path):
    """`--arms "[]"` read the random-weights features, ran no cell and then failed on a results.md it never wrote
    ("No such file or directory"): an empty list names no arm, so it is refused with the study's arms, as a typo is."""
    from ssvit.compare import Study, budget_plan

    model_kwargs = yaml.safe_load(TINY_VIT[TINY_VIT.index("--model_kwargs") + 1])
    study = Study(output_dir=str(tmp_path / "study"), budgets=[64], pretrain_shares=[0.5], arms=[],
                  objectives={"mae": {"mae.decoder_embed_dim": 16, "mae.decoder_num_heads": 2}},
                  base={"model": "vit_tiny_patch16_224", "model_kwargs": model_kwargs, "img_size": 16, "data": "synthetic:300"},
                  pretrain={"batch_size": 8}, finetune={"batch_size": 8})  # fmt: skip
    with pytest.raises(UsageError, match=r"arms: \[\] names no arm of this budget study \(its arms: scratch, mae0\.5\)"):
        budget_plan(study)
    with pytest.raises(UsageError, match=r"arms: \[\] names no arm of this study \(its arms: scratch, scratch_matched, supervised, mae\)"):
        Study(output_dir="unused", objectives={"mae": {}}, arms=[]).arm_names()
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "study"), "budgets": [64], "arms": [], "frozen": True,
                                      "objectives": study.objectives, "base": study.base, "pretrain": study.pretrain, "finetune": study.finetune}))  # fmt: skip
    with pytest.raises(UsageError, match=r"arms: \[\] names no arm"):
        main(["--config", str(config)])
    assert not (tmp_path / "study").exists()  # refused before the random-weights features were read

def test_the_figure_draws_each_read_out_as_its_own_curve(tmp_path, monkeypatch):
    """A read-out is another way of reading the same pretraining, not another point of its curve: joined by one line,
    a probe (fewer FLOPs: no backward through the backbone) and a fine-tuning drew a slope no budget made."""
    import matplotlib.axes

    from ssvit.compare import write_budget_report

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda self, xs, ys, label=None, **kw: drawn.append((label, len(xs))))
    rows = [{"kind": "budget", "arm": arm, "objective": "" if arm == "scratch" else "mae", "family": "scratch" if arm == "scratch" else "mae",
             "share": 0.0 if arm == "scratch" else 0.5, "readout": arm.partition("+")[2], "budget": budget, "label_fraction": 0.1,
             "seed": seed, "val_top1": 0.3, "top1": 0.3 + seed / 100, "flops": budget * (0.7 if "probe" in arm else 1.0), "split": "test",
             "pretrain_images": 0 if arm == "scratch" else budget, "finetune_images": budget}
            for arm in ("scratch", "mae0.5", "mae0.5+probe") for budget in (64, 128) for seed in (0, 1)]  # fmt: skip
    write_budget_report(rows, tmp_path)
    assert sorted(drawn) == [("mae, 50% of the budget pretraining", 2), ("mae, 50% of the budget pretraining, probe", 2), ("scratch", 2)]


def test_the_report_of_a_study_run_without_scratch_lists_its_cells(tmp_path):
    """`--arms "[semi]"` (one arm of a grid whose other cells ran elsewhere) crashed after its first cell: the figure's
    top axis counts budgets in scratch's fine-tuning images, and there was no scratch row to take them from."""
    from ssvit.compare import write_budget_report

    rows = [{"kind": "budget", "arm": "semi", "objective": "", "family": "semi", "share": 0.0, "readout": "", "budget": 64,
             "label_fraction": 0.1, "seed": seed, "val_top1": 0.3, "top1": 0.3 + seed / 100, "flops": 64e6, "split": "test",
             "pretrain_images": 0, "finetune_images": 8} for seed in (0, 1)]  # fmt: skip
    write_budget_report(rows, tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert "| semi | 0.1 | 64 | 0 + 8 | 6.4e+07 | 30.50% ± " in table
    assert (tmp_path / "accuracy_vs_compute.png").stat().st_size > 0


def test_freeze_backbone_trains_the_head_only(tmp_path):
    from ssvit.pretrain import main

    pre = main(tiny_args(tmp_path / "pre", "--max_steps", "2", "--fewshot_steps", "0"))["checkpoint"]
    main(tiny_args(tmp_path / "probe", "--init", pre, "--freeze_backbone", "--max_steps", "2", "--save_steps", "2",
                   "--fewshot_steps", "0", "--lr", "0.1", objective="supervised"))  # fmt: skip
    start = load_file(f"{pre}/model.safetensors")
    end = load_file(tmp_path / "probe/run/checkpoints/step_000002/model.safetensors")
    assert all(torch.equal(end[k], start[k]) for k in end if k.startswith("backbone."))
    assert end["head.weight"].abs().sum() > 0  # the zero-initialised head trained


def test_budget_study_refuses_a_split_that_is_not_whole_batches_before_any_run(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "study"), "base": {"data": "synthetic:100"},
                                      "pretrain": {"batch_size": 8}, "finetune": {"batch_size": 8},
                                      "budgets": [40], "pretrain_shares": [0.5]}))  # fmt: skip
    with pytest.raises(UsageError, match="20 fine-tuning images are not a whole number of batches of 8"):
        main(["--config", str(config)])
    config.write_text(config.read_text().replace("budgets:\n- 40", "budgets:\n- 64").replace("- 0.5", "- 1.0"))
    with pytest.raises(UsageError, match="pretrain_shares: 1.0 is not a share"):
        main(["--config", str(config)])
    config.write_text(config.read_text().replace("budgets:\n- 64", "budgets:\n- 6.4e4"))
    with pytest.raises(UsageError, match="budgets: 64000.0 is not a number of images"):
        main(["--config", str(config)])
    assert not (tmp_path / "study").exists()


def test_a_frozen_evaluation_shares_the_cores_as_training_does(tmp_path):
    """`accelerate launch` sets OMP_NUM_THREADS=1; a study's first frozen evaluation (random weights) ran before any
    training had claimed the cores back, on one thread: half the speed on 2 cores."""
    import os

    import torch

    from ssvit.compare import Study, random_init_row

    model_kwargs = yaml.safe_load(TINY_VIT[TINY_VIT.index("--model_kwargs") + 1])
    study = Study(output_dir=str(tmp_path / "study"), frozen_max_train=50,
                  base={"model": "vit_tiny_patch16_224", "model_kwargs": model_kwargs, "img_size": 16, "data": "synthetic:100"})  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        row = random_init_row(study)
        assert torch.get_num_threads() == (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)
    assert row["arm"] == "random weights" and row["train_images"] == 50


def test_a_frozen_row_is_reused_only_for_the_same_evaluation(tmp_path):
    """A reused output_dir with other frozen settings (here the training images the probe fits on) measures again
    instead of reporting the old evaluation under the new settings."""
    from ssvit.compare import Study, random_init_row

    model_kwargs = yaml.safe_load(TINY_VIT[TINY_VIT.index("--model_kwargs") + 1])
    base = {"model": "vit_tiny_patch16_224", "model_kwargs": model_kwargs, "img_size": 16, "data": "synthetic:100", "cpu_threads": 1}
    first = random_init_row(Study(output_dir=str(tmp_path / "study"), frozen_max_train=50, base=base))
    assert first["train_images"] == 50
    assert random_init_row(Study(output_dir=str(tmp_path / "study"), frozen_max_train=50, base=base)) == first
    assert random_init_row(Study(output_dir=str(tmp_path / "study"), frozen_max_train=30, base=base))["train_images"] == 30
    # A damaged record (a kill or a full disk mid-write) is measured again, not a traceback.
    done = tmp_path / "study/runs/random_init/study_frozen.json"
    done.write_text(done.read_text()[:20])
    assert random_init_row(Study(output_dir=str(tmp_path / "study"), frozen_max_train=30, base=base))["train_images"] == 30


def test_frozen_features_of_unlabeled_data_are_refused_in_one_line(tmp_path):
    from PIL import Image

    from ssvit.compare import Study, random_init_row

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(30):
        Image.new("RGB", (20, 20), (8 * i, 90, 200)).save(folder / f"{i}.png")
    model_kwargs = yaml.safe_load(TINY_VIT[TINY_VIT.index("--model_kwargs") + 1])
    study = Study(output_dir=str(tmp_path / "study"), base={"model": "vit_tiny_patch16_224", "model_kwargs": model_kwargs,
                                                            "img_size": 16, "data": f"imagefolder:{folder}"})  # fmt: skip
    with pytest.raises(UsageError, match="frozen features are scored against labels: .* has none. Set frozen: false"):
        random_init_row(study)


def test_semi_supervised_flags_are_refused_where_they_would_be_ignored_or_meaningless(tmp_path):
    """`semi` needs budgets (a fixed-budget study has no semi-supervised arm: it would be silently ignored) and an
    objective that learns from labels and draws unlabeled images; both refused before any run."""
    config = tmp_path / "study.yaml"
    base = {"output_dir": str(tmp_path / "study"), "base": {"data": "synthetic:100"}, "pretrain": {"batch_size": 8},
            "finetune": {"batch_size": 8}}  # fmt: skip
    config.write_text(yaml.safe_dump({**base, "semi": {"objective": "fixmatch"}}))
    with pytest.raises(UsageError, match="semi: semi-supervised arms are part of budget studies: add budgets"):
        main(["--config", str(config)])
    for name in ("mae", "supervised"):
        config.write_text(yaml.safe_dump({**base, "budgets": [64], "pretrain_shares": [0.5], "semi": {"objective": name}}))
        with pytest.raises(UsageError, match=f"semi: objective {name} does not fine-tune on labelled and unlabeled images"):
            main(["--config", str(config)])
    assert not (tmp_path / "study").exists()


def test_a_run_saved_before_a_setting_existed_is_reused_while_that_setting_has_its_default(tmp_path):
    """A setting added to ssvit after a study's run was saved (absent from its config.yaml) ran as its default does:
    the study resumes after an upgrade. The same setting away from its default is a change, named by its path."""
    argv = tiny_args(tmp_path, "--max_steps", "2", "--fewshot_steps", "0")
    first = run_once(argv, tmp_path / "run")
    saved = tmp_path / "run/config.yaml"
    config = yaml.safe_load(saved.read_text())
    del config["fixmatch"]["thresholding"], config["hflip"]  # as a run saved before these options existed
    saved.write_text(yaml.safe_dump(config))
    assert run_once(argv, tmp_path / "run") == first
    with pytest.raises(UsageError, match=r"other settings \(fixmatch\.thresholding: 'fixed' there, 'self_adaptive' now\)"):
        run_once([*argv, "--fixmatch.thresholding", "self_adaptive"], tmp_path / "run")
    with pytest.raises(UsageError, match=r"other settings \(lr: .* there, 0\.5 now\)"):
        run_once([*argv, "--lr", "0.5"], tmp_path / "run")
