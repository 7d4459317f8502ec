"""DINO (objectives/dino.py) and what the loop gives it: views in every data mode, a hook once per optimizer step, a
momentum teacher saved, resumed and released, the same training on one process or two, collapse stopped."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from torchvision.transforms import v2

from ssvit.config import TrainConfig, parse
from ssvit.data import Augmentation, Photometric, View, Views, collate, load_splits, photometric
from ssvit.errors import CollapseError, UsageError
from ssvit.export import main as export_main
from ssvit.objectives.base import Progress
from ssvit.objectives.dino import DINO, cosine, dino_loss
from ssvit.pretrain import main
from ssvit.stream import streaming_splits
from ssvit.train import build_objective

from conftest import ROOT, tiny_args
from test_multiprocess import launch

SMALL_HEAD = ["--dino.out_dim", "64", "--dino.hidden_dim", "32", "--dino.bottleneck_dim", "16", "--dino.local_crops", "2"]


def dino_args(tmp_path, *extra):
    return tiny_args(tmp_path, *SMALL_HEAD, "--fewshot_steps", "0", *extra, objective="dino")


def model(*extra):
    run = parse(dino_args(ROOT / "unused", *extra))
    return run, build_objective(run, 0)


@pytest.mark.parametrize("mode", ["cached", "decoded", "streaming"])
def test_every_data_mode_yields_the_views_seeded_per_item(mode, shards, monkeypatch):
    """2 global crops at --img_size and 2 local ones at 16 x 96 / 224 -> 8 px (rounded to the 4-px patch); the same
    item, epoch and seed give the same crops (so exact resume holds), another epoch others."""
    run, objective = model()
    views = type(objective).views(run.train, run.objective_options)
    cfg = TrainConfig(data=f"parquet:{shards}", img_size=16, streaming=mode == "streaming")
    if mode == "decoded":
        monkeypatch.setenv("SSVIT_MAX_CACHE_BYTES", "0")
    if mode == "streaming":
        train = streaming_splits(cfg, 0, 1, 8, views).train
        train.set_workers(0)
        first, again = next(iter(train)), next(iter(train))
        train.set_position(1, 0)
        other = next(iter(train))
    else:
        train = load_splits(cfg, views=views).train
        first, again, other = train[(0, 3)], train[(0, 3)], train[(1, 3)]
        assert ("decoded per image" in load_splits(cfg).description) == (mode == "decoded")
    crops = first["image"]
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 2 and crops[0].dtype == torch.uint8
    assert [v.scale for v in views.views] == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 2  # the paper's scale ranges
    assert all(torch.equal(a, b) for a, b in zip(crops, again["image"]))
    assert not all(torch.equal(a, b) for a, b in zip(crops, other["image"]))


def test_photometric_augmentation_does_what_it_names():
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    rng = random.Random(0)
    assert torch.equal(Photometric(jitter_prob=0, grayscale_prob=0)(image, rng), image)
    gray = Photometric(jitter_prob=0, grayscale_prob=1)(image, rng)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    solar = Photometric(jitter_prob=0, grayscale_prob=0, solarize_prob=1)(image, rng)
    assert torch.equal(solar, torch.where(image >= 128, 255 - image, image))
    blurred = Photometric(jitter_prob=0, grayscale_prob=0, blur_prob=1, blur_sigma=(2.0, 2.0))(image, rng)
    assert blurred.float().std() < image.float().std() / 2


def one_at_a_time(image: torch.Tensor, draw) -> torch.Tensor:
    """A draw applied by torchvision's public functions, one crop and one op per call."""
    f = v2.functional
    if draw.jitter:
        factors, order = draw.jitter
        for i in order:
            image = (f.adjust_brightness, f.adjust_contrast, f.adjust_saturation, f.adjust_hue)[i](image, factors[i])
    if draw.grayscale:
        image = f.rgb_to_grayscale(image, num_output_channels=3)
    if draw.sigma is not None:
        k = min(2 * math.ceil(3 * draw.sigma) + 1, 2 * ((min(image.shape[-2:]) - 1) // 2) + 1)
        image = f.gaussian_blur(image, [k, k], [draw.sigma, draw.sigma])
    return f.solarize(image, 128) if draw.solarize else image


@pytest.mark.parametrize("size", [12, 32])
def test_photometric_on_a_batch_of_crops_is_torchvision_one_crop_at_a_time_bit_for_bit(size):
    rng, aug = random.Random(size), Photometric(jitter_prob=0.9, grayscale_prob=0.3, blur_prob=0.5, solarize_prob=0.3)
    images = torch.randint(0, 256, (64, 3, size, size), dtype=torch.uint8)
    draws = [aug.draw(rng) for _ in images]
    assert len({d.jitter[1] for d in draws if d.jitter}) > 10 and sum(d.sigma is not None for d in draws) > 10
    batched = photometric(images, draws)
    assert all(torch.equal(b, one_at_a_time(x, d)) for b, x, d in zip(batched, images, draws))


def test_views_draw_each_crop_then_its_photometric_in_turn_and_apply_them_by_size():
    """The RNG is read in the order of DINO's per-view transforms (crop, then its photometric draws), as it always
    was, so a run's crops are the ones drawn one view at a time."""
    views = Views(tuple(View(s, (0.2, 1.0), Photometric(blur_prob=0.5, solarize_prob=0.2)) for s in (16, 16, 8, 8, 8)))
    image = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    rng, expected = random.Random(7), []
    for view in views.views:
        crop = Augmentation(view.size, view.scale, hflip=view.hflip, interpolation=view.interpolation)(image, rng)
        expected.append(one_at_a_time(crop, view.photometric.draw(rng)))
    assert all(torch.equal(a, b) for a, b in zip(views(image, random.Random(7)).finished(), expected))


def test_collate_applies_each_views_photometric_to_the_batch_as_to_each_item_alone():
    views = DINO.views(TrainConfig(objective="dino", img_size=32, model_kwargs={"patch_size": 4}), DINO.Options())
    items = [{"image": views(torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8), random.Random(i)), "label": i} for i in range(16)]
    assert all(any(d is not None for d in item["image"].pending) for item in items)  # pending until collated
    batch = collate(items)
    assert batch["label"].tolist() == list(range(16)) and len(batch["image"]) == len(views.views)
    alone = [item["image"].finished() for item in items]
    assert all(torch.equal(crops[i], alone[i][v]) for v, crops in enumerate(batch["image"]) for i in range(len(items)))


def test_the_loss_pairs_each_teacher_view_with_every_other_student_view():
    torch.manual_seed(0)
    student, teacher = [torch.randn(4, 8) for _ in range(4)], [torch.randn(4, 8) for _ in range(2)]
    loss, _ = dino_loss(student, teacher, torch.zeros(1, 8), 0.1, 0.04)
    pairs = [(t, s) for t in range(2) for s in range(4) if s != t]
    ce = lambda t, s: -(torch.softmax(teacher[t] / 0.04, -1) * torch.log_softmax(student[s] / 0.1, -1)).sum(-1).mean()  # noqa: E731
    assert len(pairs) == 6 and torch.isclose(loss, sum(ce(t, s) for t, s in pairs) / 6)


def test_forward_changes_no_state_and_the_hook_moves_teacher_centre_and_schedules():
    run, objective = model()
    views = type(objective).views(run.train, run.objective_options).example(4)
    before = {k: v.clone() for k, v in objective.state_dict().items()}
    out = objective(views, None)
    assert all(torch.equal(before[k], v) for k, v in objective.state_dict().items())  # forward: no side effects
    assert not any(p.requires_grad for p in [*objective.teacher_backbone.parameters(), *objective.teacher_head.parameters()])
    out.loss.backward()
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.04)
    optimizer.step()
    student = {k: v.clone() for k, v in objective.backbone.state_dict().items()}
    objective.on_train_step(out)
    objective.on_optimizer_step(Progress(1, 10, 5, optimizer))
    m = cosine(0.996, 1.0, 0, 10)
    assert m == pytest.approx(0.996)
    for k, teacher in objective.teacher_backbone.state_dict().items():  # teacher = m * teacher + (1 - m) * student
        torch.testing.assert_close(teacher, m * before[f"teacher_backbone.{k}"] + (1 - m) * student[k])
    teacher_mean = out.extras["teacher_sum"] / out.extras["teacher_rows"]
    torch.testing.assert_close(objective.centre, 0.1 * teacher_mean)  # centre 0 -> 0.9 * 0 + 0.1 * batch mean
    warm = 30 * 5  # 30 epochs of 5 steps: after step 1 of 150, 1/150 of the way from 0.04 to 0.07
    assert float(objective.teacher_temp_now) == pytest.approx(0.04 + 0.03 / warm)
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(cosine(0.04, 0.4, 1, 10))


def test_the_last_layer_is_held_for_the_first_epoch():
    run, objective = model()
    out = objective(type(objective).views(run.train, run.objective_options).example(2), None)
    out.loss.backward()
    objective.on_before_optimizer_step(Progress(0, 100, 10, None))  # first epoch: dropped
    assert objective.head.last_v.grad is None and objective.head.mlp[0].weight.grad is not None
    out = objective(type(objective).views(run.train, run.objective_options).example(2), None)
    out.loss.backward()
    objective.on_before_optimizer_step(Progress(10, 100, 10, None))  # second epoch: trained
    assert objective.head.last_v.grad is not None


def test_the_hook_runs_once_per_optimizer_step_under_accumulation(tmp_path, monkeypatch):
    seen = []
    original = DINO.on_optimizer_step
    monkeypatch.setattr(DINO, "on_optimizer_step", lambda self, progress: (seen.append(progress.step), original(self, progress)))
    main(dino_args(tmp_path, "--max_steps", "3", "--gradient_accumulation_steps", "2"))
    assert seen == [1, 2, 3]


def test_dino_trains_saves_its_teacher_and_releases_it(tmp_path):
    result = main(dino_args(tmp_path, "--max_steps", "3", "--save_steps", "3", "--eval_steps", "3"))
    assert result["steps"] == 3 and math.isfinite(result["val/loss"]) and "val/teacher_entropy" in result
    logged = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    assert {"train/teacher_entropy", "train/teacher_kl", "train/teacher_temp"} <= set(logged)
    ckpt = tmp_path / "run/checkpoints/step_000003"
    state = load_file(ckpt / "model.safetensors")
    assert {"centre", "teacher_temp_now", "teacher_backbone.cls_token", "teacher_head.last_v"} <= set(state)
    assert not torch.equal(state["teacher_backbone.blocks.0.attn.qkv.weight"], state["backbone.blocks.0.attn.qkv.weight"])
    for flag, prefix in (([], "teacher_backbone."), (["--checkpoint_key", "backbone"], "backbone.")):
        out = tmp_path / f"export{len(flag)}"
        export_main([str(ckpt), "--out", str(out), *flag])
        exported = load_file(out / "model.safetensors")
        assert torch.equal(exported["blocks.0.attn.qkv.weight"], state[f"{prefix}blocks.0.attn.qkv.weight"])
    with pytest.raises(UsageError, match=r"--checkpoint_key studnet: .* has no backbone under it; its backbones are: backbone, teacher_backbone"):
        export_main([str(ckpt), "--out", str(tmp_path / "typo"), "--checkpoint_key", "studnet"])
    import timm

    plain = timm.create_model(f"local-dir:{tmp_path / 'export0'}", pretrained=True)  # the teacher, as plain timm loads it
    torch.testing.assert_close(plain.state_dict()["blocks.0.attn.qkv.weight"], state["teacher_backbone.blocks.0.attn.qkv.weight"])
    for init in (ckpt, tmp_path / "export0"):  # fine-tuned from the checkpoint and from the exported teacher
        ft = tmp_path / f"ft_{init.name}"
        tuned = main(tiny_args(ft, "--init", str(init), "--max_steps", "1", "--lr", "1e-12",
                               "--fewshot_steps", "0", "--save_steps", "1", objective="supervised"))  # fmt: skip
        start = load_file(ft / "run/checkpoints/step_000001/model.safetensors")["backbone.blocks.0.attn.qkv.weight"]
        assert tuned["steps"] == 1
        torch.testing.assert_close(start, state["teacher_backbone.blocks.0.attn.qkv.weight"], rtol=1e-4, atol=1e-6)


def test_one_process_and_two_train_the_same_weights_teacher_and_centre(tmp_path):
    common = ["--max_steps", "3", "--save_steps", "3", "--eval_steps", "3", "--eval_batches", "1"]
    main(dino_args(tmp_path / "one", *common))
    launch("ssvit/pretrain.py", *dino_args(tmp_path / "two", *common))
    assert json.loads((tmp_path / "two/run/results.json").read_text())["num_processes"] == 2
    one = load_file(tmp_path / "one/run/checkpoints/step_000003/model.safetensors")
    two = load_file(tmp_path / "two/run/checkpoints/step_000003/model.safetensors")
    assert set(one) == set(two)
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5, msg=key)
    assert not torch.equal(one["centre"], torch.zeros_like(one["centre"]))


@pytest.mark.parametrize("flags, message", [
    (["--dino.global_crops", "0"], "--dino.global_crops 0: must be 1 or more"),
    (["--dino.global_crops", "1", "--dino.local_crops", "0"], "at least two crops"),
    (["--dino.local_crop_size", "24"], "local_crop_size 24 is larger than the global crops"),
    (["--dino.momentum_teacher", "1.5"], "--dino.momentum_teacher 1.5: must be in \\[0, 1\\]"),
    (["--dino.teacher_temp", "0.2"], "at most --dino.student_temp 0.1"),
])  # fmt: skip
def test_bad_dino_options_are_refused_at_start_up_by_name(tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        main(dino_args(tmp_path, *flags))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_model_without_a_feature_vector_is_refused(tmp_path):
    with pytest.raises(UsageError, match="needs one feature vector per image"):
        main(dino_args(tmp_path, "--model_kwargs", "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, global_pool: ''}"))


def test_collapse_is_seen_and_stops_the_run_naming_the_last_checkpoint(tmp_path, monkeypatch):
    objective = model("--dino.collapse_logs", "2")[1]
    top = math.log(64)
    assert objective.health({"teacher_entropy": 0.5 * top}) is None
    assert objective.health({"teacher_entropy": 0.0}) is None  # once: not yet
    assert "one output for every image" in objective.health({"teacher_entropy": 0.0})
    assert objective.health({"teacher_entropy": 0.5 * top}) is None  # the count restarts
    monkeypatch.setattr(DINO, "health", lambda self, logs: "DINO collapsed (test)" if logs.get("teacher_temp") and self.training and
                        len(list((tmp_path / "run/checkpoints").glob("step_*"))) else None)  # fmt: skip
    with pytest.raises(CollapseError, match=r"DINO collapsed \(test\) at step 3.*last good checkpoint is .*step_000002"):
        main(dino_args(tmp_path, "--max_steps", "6", "--save_steps", "2"))


def test_weighted_knn_is_dinos_vote():
    """Neighbours vote with exp(similarity / T): two far neighbours of class 1 lose to one close neighbour of class 0
    that a plain vote outnumbers."""
    from ssvit.features import knn_accuracy

    train = torch.tensor([[1.0, 0.0], [0.2, 1.0], [0.2, -1.0]])
    labels = torch.tensor([0, 1, 1])
    query, truth = torch.tensor([[1.0, 0.05]]), torch.tensor([0])
    assert knn_accuracy(train, labels, query, truth, 2, k=3) == 0.0
    assert knn_accuracy(train, labels, query, truth, 2, k=3, temperature=0.07) == 1.0


def test_a_study_counts_every_crop_and_gives_dino_fewer_images_for_the_same_flops(tmp_path):
    """Multi-crop makes a DINO image cost several passes (2 global crops through student and teacher, the local
    ones through the student): a FLOPs-matched budget gives it fewer pretraining images than masked patch."""
    import yaml

    from ssvit.compare import counted_flops, main as compare_main

    from conftest import TINY_VIT

    base = {"model": "vit_tiny_patch16_224", "model_kwargs": yaml.safe_load(TINY_VIT[TINY_VIT.index("--model_kwargs") + 1]),
            "img_size": 16, "data": "synthetic:300", "mixed_precision": "no", "report_to": [], "cpu_threads": 1,
            "eval_batches": 1, "test_fraction": 0.1}  # fmt: skip
    flags = ["--model_kwargs", str(base["model_kwargs"]), "--img_size", "16"]
    dino, mpp = counted_flops([*flags, "--objective", "dino", *SMALL_HEAD]), counted_flops([*flags, "--objective", "masked_patch"])
    assert dino > 2 * mpp
    study = {"output_dir": str(tmp_path / "study"), "base": base, "pretrain": {"batch_size": 8, "max_steps": 4, "warmup_steps": 1},
             "finetune": {"batch_size": 8, "max_steps": 4, "warmup_steps": 1}, "label_fractions": [0.5], "seeds": [0],
             "budgets": [128], "pretrain_shares": [0.5],
             "objectives": {"masked_patch": {}, "dino": dict(zip([f.removeprefix("--") for f in SMALL_HEAD[::2]], SMALL_HEAD[1::2]))}}  # fmt: skip
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    rows = compare_main(["--config", str(tmp_path / "study.yaml")])
    images = {r["objective"]: r["pretrain_images"] for r in rows if r["kind"] == "budget" and r["objective"]}
    assert set(images) == {"masked_patch", "dino"} and 0 < images["dino"] < images["masked_patch"]


def test_the_teacher_temperature_starts_where_the_official_schedule_does_and_crops_resize_bicubic():
    """With a warm-up, at warmup_teacher_temp; without one, at teacher_temp from the first step (it started at the
    warm-up value). Crops are resized bicubic, as the official RandomResizedCrop."""
    assert float(model()[1].teacher_temp_now) == pytest.approx(0.04)
    assert float(model("--dino.warmup_teacher_temp_epochs", "0")[1].teacher_temp_now) == pytest.approx(0.07)
    run, objective = model()
    assert {v.interpolation for v in type(objective).views(run.train, run.objective_options).views} == {"bicubic"}


def test_with_init_the_teacher_starts_from_the_loaded_backbone(tmp_path):
    pre = main(tiny_args(tmp_path / "pre", "--max_steps", "2", "--fewshot_steps", "0"))["checkpoint"]
    run, objective = model("--init", pre)
    state = load_file(f"{pre}/model.safetensors")
    torch.testing.assert_close(objective.backbone.blocks[0].attn.qkv.weight, state["backbone.blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(objective.teacher_backbone.blocks[0].attn.qkv.weight, objective.backbone.blocks[0].attn.qkv.weight)
