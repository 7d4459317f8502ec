"""Semi-supervised fine-tuning (objectives/fixmatch.py) and the second, unlabeled stream the loop gives it: pseudo-labels
from the weak view through no gradient, the threshold's mask, the EMA teacher moved once per optimizer step, FLOPs
that count every forward, one process and two the same, exact resume of both streams."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from ssvit.config import parse
from ssvit.data import RandAugment, load_splits
from ssvit.errors import UsageError
from ssvit.finetune import main as finetune_main
from ssvit.objectives.base import Progress
from ssvit.pretrain import main
from ssvit.train import build_objective, example_batch, inputs

from conftest import ROOT, tiny_args
from test_multiprocess import launch


def fixmatch_args(tmp_path, *extra):
    return tiny_args(tmp_path, "--fixmatch.mu", "2", "--label_fraction", "0.1", "--fewshot_steps", "0", *extra, objective="fixmatch")


def model(*extra):
    run = parse(fixmatch_args(ROOT / "unused", *extra))
    torch.manual_seed(0)
    objective = build_objective(run, 10)
    torch.nn.init.normal_(objective.head.weight, std=1.0)  # confident predictions (the head starts at zero)
    return run, objective


def test_the_unlabeled_stream_is_every_training_image_as_a_weak_and_a_strong_view():
    run, objective = model()
    splits = load_splits(run.train, unlabeled_views=type(objective).unlabeled(run.train, run.objective_options).views)
    assert len(splits.train) == 54 and len(splits.unlabeled) == 540  # 10% of 540 labelled; all 540 unlabeled
    weak, strong = splits.unlabeled[(0, 7)]["image"]
    again = splits.unlabeled[(0, 7)]["image"]
    assert weak.shape == strong.shape == (3, 16, 16) and weak.dtype == torch.uint8
    assert torch.equal(weak, again[0]) and torch.equal(strong, again[1])  # seeded per (epoch, item): exact resume
    assert not torch.equal(splits.unlabeled[(1, 7)]["image"][1], strong)


def test_randaugment_is_drawn_from_the_item_rng_and_leaves_torch_rng_alone():
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    a, b = RandAugment()(image, random.Random(1)), RandAugment()(image, random.Random(1))
    assert torch.equal(a, b) and not torch.equal(a, image)
    assert torch.equal(torch.get_rng_state(), before)
    assert (RandAugment(num_ops=0, cutout=0.5)(image, random.Random(2)) == 127).any()  # Cutout's grey square


@pytest.mark.parametrize("teacher", ["model", "ema"])
def test_pseudo_labels_come_from_the_weak_view_through_no_gradient(teacher):
    run, objective = model("--fixmatch.teacher", teacher, "--fixmatch.threshold", "0")
    batch = example_batch(run, 4)
    weak, strong = (v.requires_grad_() for v in batch["unlabeled"])
    out = objective(batch["image"], batch["label"], [weak, strong])
    with torch.no_grad():
        labeller = objective if teacher == "model" else None
        expected = (labeller.logits(weak) if labeller else objective.teacher["head"](objective.teacher["backbone"](objective.normalize(weak))))
    assert torch.equal(out.extras["pseudo"], expected.argmax(-1))
    out.loss.backward()
    assert weak.grad is None or not weak.grad.any()  # no gradient reaches the weak view
    assert strong.grad is not None and strong.grad.any()
    # The strong view does not change the pseudo-labels.
    other = objective(batch["image"], batch["label"], [weak.detach(), torch.rand_like(strong)])
    assert torch.equal(other.extras["pseudo"], out.extras["pseudo"])


def test_the_threshold_masks_the_unlabeled_loss():
    run, objective = model()
    batch = example_batch(run, 4)
    logs = {}
    for threshold in (0.0, 1.0):
        objective.options.threshold = threshold
        logs[threshold] = objective(*inputs(batch))
    assert logs[0.0].logs["mask"] == 1 and logs[0.0].logs["loss_u"] > 0
    assert logs[1.0].logs["mask"] < 1
    kept = logs[1.0].extras["mask"]
    assert torch.equal(kept, (torch.softmax(objective.logits(batch["unlabeled"][0]), -1).max(-1).values >= 1.0).float())
    objective.options.threshold = 0.5
    out = objective(*inputs(batch))
    assert 0 < out.logs["mask"] < 1  # some images above, some below
    supervised_only = objective(batch["image"], batch["label"])
    torch.testing.assert_close(out.logs["loss_x"], supervised_only.loss)
    torch.testing.assert_close(out.loss, out.logs["loss_x"] + out.logs["loss_u"])


def test_the_self_adaptive_threshold_starts_at_one_over_c_and_moves_once_per_optimizer_step():
    """FreeMatch (section 3.2): tau = EMA of the mean confidence, from 1/C; per class tau * p~(c) / max p~, with p~ the
    EMA of the mean probabilities; forward reads them, the optimizer step moves them, over all micro-batches."""
    run, objective = model("--fixmatch.thresholding", "self_adaptive", "--fixmatch.ema_p", "0.9")
    assert objective.time_p == pytest.approx(0.1) and torch.allclose(objective.p_model, torch.full((10,), 0.1))
    batches = [example_batch(run, 4) for _ in range(2)]
    outs = [objective(*inputs(b)) for b in batches]
    assert all(out.logs["mask"] == 1 and out.logs["threshold"] == pytest.approx(0.1) for out in outs)  # max prob >= 1/C
    assert objective.time_p == pytest.approx(0.1)  # forward changed nothing
    for out in outs:
        objective.on_train_step(out)
    objective.on_optimizer_step(Progress(1, 10, 10, None))
    with torch.no_grad():
        probs = torch.softmax(objective.logits(torch.cat([b["unlabeled"][0] for b in batches])), -1)
    torch.testing.assert_close(objective.time_p, 0.9 * 0.1 + 0.1 * probs.max(-1).values.mean())
    torch.testing.assert_close(objective.p_model, 0.9 * 0.1 + 0.1 * probs.mean(0))
    objective.time_p.fill_(0.8)
    objective.p_model.copy_(torch.linspace(0.05, 0.5, 10))  # the last class the likeliest: its threshold 0.8, the first's 0.08
    out = objective(*inputs(batches[0]))
    confidence, pseudo = torch.softmax(objective.logits(batches[0]["unlabeled"][0]), -1).max(-1)
    assert torch.equal(out.extras["mask"], (confidence >= 0.8 * objective.p_model[pseudo] / 0.5).float())
    assert 0 < out.logs["mask"] < 1


def test_the_ema_teacher_moves_once_per_optimizer_step(tmp_path, monkeypatch):
    from ssvit.objectives.fixmatch import FixMatch

    run, objective = model("--fixmatch.teacher", "ema", "--fixmatch.ema_momentum", "0.9")
    teacher = objective.teacher["backbone"].blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        objective.backbone.blocks[0].attn.qkv.weight.add_(1.0)
    objective.on_optimizer_step(Progress(1, 10, 10, None))
    torch.testing.assert_close(objective.teacher["backbone"].blocks[0].attn.qkv.weight,
                               0.9 * teacher + 0.1 * objective.backbone.blocks[0].attn.qkv.weight)  # fmt: skip
    calls = []
    real = FixMatch.on_optimizer_step
    monkeypatch.setattr(FixMatch, "on_optimizer_step", lambda self, progress: (calls.append(progress.step), real(self, progress)))
    main(fixmatch_args(tmp_path, "--fixmatch.teacher", "ema", "--max_steps", "3", "--gradient_accumulation_steps", "2"))
    assert calls == [1, 2, 3]  # 6 micro-steps, 3 optimizer steps


def test_flops_count_the_unlabeled_images_and_the_teacher():
    def flops(*extra):
        run, objective = model(*extra)
        with FlopCounterMode(display=False) as counter:
            objective(*inputs(example_batch(run, 2))).loss.backward()
        return counter.get_total_flops()

    run, objective = model()
    with FlopCounterMode(display=False) as counter:
        objective(*inputs({k: v for k, v in example_batch(run, 2).items() if k != "unlabeled"})).loss.backward()
    supervised = counter.get_total_flops()
    assert flops() == pytest.approx(supervised * (1 + 2 * 2))  # mu 2: 2 + 4 + 4 images through forward and backward
    ema = flops("--fixmatch.teacher", "ema")
    assert supervised * (1 + 2) < ema < flops()  # the teacher's forward on the weak views counts, with no backward


def test_one_process_and_two_train_the_same_weights(tmp_path):
    common = ["--max_steps", "3", "--save_steps", "3", "--eval_steps", "3", "--eval_batches", "1", "--fixmatch.threshold", "0",
              "--fixmatch.teacher", "ema", "--fixmatch.ema_momentum", "0.5", "--fixmatch.thresholding", "self_adaptive",
              "--fixmatch.ema_p", "0.5"]  # fmt: skip
    main(fixmatch_args(tmp_path / "one", *common))
    launch("ssvit/pretrain.py", *fixmatch_args(tmp_path / "two", *common))
    assert json.loads((tmp_path / "two/run/results.json").read_text())["num_processes"] == 2
    one = load_file(tmp_path / "one/run/checkpoints/step_000003/model.safetensors")
    two = load_file(tmp_path / "two/run/checkpoints/step_000003/model.safetensors")
    assert set(one) == set(two) and any(k.startswith("teacher.") for k in one) and {"time_p", "p_model"} <= set(one)
    assert one["time_p"] != 0.1  # the averages moved, over the global batch in both
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5, msg=key)


def test_fine_tunes_from_a_checkpoint_and_logs_the_mask(tmp_path):
    pretrained = main(tiny_args(tmp_path / "pre", "--max_steps", "2", "--fewshot_steps", "0"))
    result = finetune_main(["--init", pretrained["checkpoint"], *fixmatch_args(tmp_path / "ft", "--max_steps", "2")])
    assert result["steps"] == 2 and result["objective"] == "fixmatch" and "val/top1" in result
    rows = [json.loads(line) for line in (tmp_path / "ft/run/metrics.jsonl").read_text().splitlines()]
    assert {"train/mask", "train/loss_u", "train/loss_x"} <= set(rows[0])


@pytest.mark.parametrize("flags, message", [
    (["--fixmatch.mu", "0"], "--fixmatch.mu 0: must be 1 or more"),
    (["--fixmatch.threshold", "1.5"], "--fixmatch.threshold 1.5: must be in \\[0, 1\\]"),
    (["--fixmatch.ema_momentum", "1"], "--fixmatch.ema_momentum 1.0: must be in \\[0, 1\\)"),
    (["--fixmatch.ema_p", "1"], "--fixmatch.ema_p 1.0: must be in \\[0, 1\\)"),
    (["--fixmatch.thresholding", "adaptive"], "fixmatch.thresholding.*self_adaptive.*Got value: adaptive"),
    (["--fixmatch.mu", "40"], "40 x --batch_size 16 unlabeled images per step is more than the 540 training images"),
    (["--streaming"], "draws a second, unlabeled stream of images, which --streaming does not provide"),
    (["--fixmatch.loss", "sigmoid"], "--fixmatch.loss sigmoid: must be softmax"),
])  # fmt: skip
def test_bad_options_are_one_line(tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        main(fixmatch_args(tmp_path, *flags))


def test_with_init_the_teacher_starts_from_the_loaded_weights_and_a_classifier_keeps_its_head(tmp_path):
    """Semi-ViT's order (pretraining, supervised fine-tuning, then semi-supervised fine-tuning): from a fine-tuned
    classifier of the same classes, the model and its EMA teacher start from its backbone and its head, so that the
    pseudo-labels start confident; from a self-supervised checkpoint, the head is new (zero) and the teacher is the
    loaded backbone, not the random one the objective was built with."""
    pre = main(tiny_args(tmp_path / "pre", "--max_steps", "2", "--fewshot_steps", "0"))["checkpoint"]
    tuned = finetune_main(["--init", pre, *tiny_args(tmp_path / "ft", "--max_steps", "2", "--fewshot_steps", "0", objective="supervised")])
    for init, head in ((pre, False), (tuned["checkpoint"], True)):
        run = parse(["--init", init, *fixmatch_args(tmp_path / "unused", "--fixmatch.teacher", "ema")])
        objective = build_objective(run, 10)
        state = load_file(f"{init}/model.safetensors")
        torch.testing.assert_close(objective.backbone.blocks[0].attn.qkv.weight, state["backbone.blocks.0.attn.qkv.weight"])
        torch.testing.assert_close(objective.teacher["backbone"].blocks[0].attn.qkv.weight, objective.backbone.blocks[0].attn.qkv.weight)
        if head:
            torch.testing.assert_close(objective.head.weight, state["head.weight"])
            assert objective.head.weight.any()
        else:
            assert not objective.head.weight.any()  # zero-initialised: masked patch's head is no classifier
        torch.testing.assert_close(objective.teacher["head"].weight, objective.head.weight)


def test_the_ema_teacher_is_a_backbone_to_evaluate_or_export_by_name(tmp_path):
    """FixMatch's implementations evaluate their EMA model: `--checkpoint_key teacher` passed the check (keys
    start with it) and then failed on 30 unexpected keys with advice about --model; the teacher's backbone is
    teacher.backbone, and the refusal of `teacher` lists the backbones the checkpoint holds."""
    from ssvit.export import main as export_main

    main(fixmatch_args(tmp_path, "--fixmatch.teacher", "ema", "--max_steps", "2", "--save_steps", "2"))
    ckpt = tmp_path / "run/checkpoints/step_000002"
    state = load_file(ckpt / "model.safetensors")
    export_main([str(ckpt), "--out", str(tmp_path / "teacher"), "--checkpoint_key", "teacher.backbone"])
    exported = load_file(tmp_path / "teacher/model.safetensors")
    assert torch.equal(exported["blocks.0.attn.qkv.weight"], state["teacher.backbone.blocks.0.attn.qkv.weight"])
    assert not torch.equal(exported["blocks.0.attn.qkv.weight"], state["backbone.blocks.0.attn.qkv.weight"])
    with pytest.raises(UsageError, match=r"--checkpoint_key teacher: .* has no backbone under it; its backbones are: backbone, teacher\.backbone\.$"):
        export_main([str(ckpt), "--out", str(tmp_path / "typo"), "--checkpoint_key", "teacher"])


def test_a_head_started_from_the_read_out_is_the_ema_teacher_s_too():
    """--fixmatch.lsq_head sets the head before the first step; the EMA teacher, copied when the objective was built,
    must label with that head, not the zero one."""
    run = parse(fixmatch_args(ROOT / "unused", "--fixmatch.teacher", "ema", "--fixmatch.lsq_head", "true"))
    objective = build_objective(run, 10)
    objective.on_train_start(load_splits(run.train).train)
    assert objective.head.weight.abs().sum() > 0
    assert torch.equal(objective.teacher["head"].weight, objective.head.weight)
    assert torch.equal(objective.teacher["head"].bias, objective.head.bias)
