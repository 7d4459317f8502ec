"""Joint training (--aux): a labelled objective plus a self-supervised one on every training image, one backbone, one
step. Contracts: the loss is main's plus the weighted aux's on their own batches; the backbone is held and saved once;
the aux's views, ratio and hooks are its own; the checkpoint is read as main's; bad pairs are one line."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ssvit.config import parse
from ssvit.errors import UsageError
from ssvit.export import main as export_main
from ssvit.objectives.dino import DINO
from ssvit.pretrain import main
from ssvit.train import build_objective, example_batch, inputs

from conftest import ROOT, tiny_args

DINO_SMALL = ["--dino.out_dim", "64", "--dino.hidden_dim", "32", "--dino.bottleneck_dim", "16", "--dino.local_crops", "2"]


def joint_args(tmp_path, aux, *extra):
    return tiny_args(tmp_path, "--aux", aux, "--fewshot_steps", "0", *extra, objective="supervised")


def test_the_loss_is_main_s_on_the_labelled_batch_plus_the_weighted_aux_s_on_the_unlabeled_one():
    run = parse(joint_args(ROOT / "unused", "mae", "--aux_weight", "0.5", "--aux_ratio", "2"))
    objective = build_objective(run, 10)
    batch = example_batch(run, 4)
    assert batch["unlabeled"][0].shape[0] == 8  # --aux_ratio 2 x the batch, one crop (MAE has no views of its own)
    torch.manual_seed(0)
    out = objective(*inputs(batch))
    torch.manual_seed(0)  # MAE's masks are drawn after main's forward, which draws nothing
    alone = objective.aux(batch["unlabeled"][0])
    supervised = objective(batch["image"], batch["label"])
    torch.testing.assert_close(out.loss, supervised.loss + 0.5 * alone.loss)
    assert {"main_loss", "aux_loss", "aux_r2"} <= set(out.logs)


def test_one_backbone_trained_and_saved_once_and_read_as_main_s(tmp_path):
    result = main(joint_args(tmp_path, "mae", "--max_steps", "2", "--save_steps", "2"))
    assert result["steps"] == 2 and "val/top1" in result  # validation is main's
    run = parse(joint_args(tmp_path / "unused", "mae"))
    objective = build_objective(run, 10)
    assert objective.aux.backbone is objective.backbone
    state = load_file(tmp_path / "run/checkpoints/step_000002/model.safetensors")
    assert not any(k.startswith("aux.backbone.") for k in state) and "aux.mask_token" in state and "head.weight" in state
    assert len([p for p in objective.parameters()]) == len(set(map(id, objective.parameters())))
    export_main([str(tmp_path / "run/checkpoints/step_000002"), "--out", str(tmp_path / "exported"), "--with_head"])
    assert torch.equal(load_file(tmp_path / "exported/model.safetensors")["head.weight"], state["head.weight"])


def test_a_multi_crop_aux_keeps_its_views_hooks_and_state(tmp_path, monkeypatch):
    run = parse(joint_args(ROOT / "unused", "dino", *DINO_SMALL))
    stream = run.objective_class.unlabeled(run.train, run.objective_options)
    assert [v.size for v in stream.views.views] == [16, 16, 8, 8] and stream.ratio == 1  # DINO's 2 global + 2 local crops
    calls = []
    real = DINO.on_optimizer_step
    monkeypatch.setattr(DINO, "on_optimizer_step", lambda self, progress: (calls.append(progress.step), real(self, progress)))
    main(joint_args(tmp_path, "dino", *DINO_SMALL, "--max_steps", "3", "--save_steps", "3", "--gradient_accumulation_steps", "2"))
    assert calls == [1, 2, 3]  # the teacher moves once per optimizer step
    state = load_file(tmp_path / "run/checkpoints/step_000003/model.safetensors")
    assert {"aux.centre", "aux.teacher_backbone.cls_token"} <= set(state)
    assert not torch.equal(state["aux.centre"], torch.zeros_like(state["aux.centre"]))
    logged = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    assert {"train/aux_teacher_entropy", "train/main_loss"} <= set(logged)


@pytest.mark.parametrize("flags, message", [
    (["--aux", "maee"], "--aux maee: no such objective"),
    (["--objective", "mae", "--aux", "simmim"], "joint training adds a self-supervised objective .* to one that learns from labels"),
    (["--aux", "supervised"], "joint training adds a self-supervised objective"),
    (["--objective", "fixmatch", "--aux", "mae"], "already draws the second stream"),
    (["--aux", "mae", "--aux_weight", "-1"], "--aux_weight -1.0: must be 0 or more"),
    (["--aux", "mae", "--mae.mask_ratio", "1.5"], "--mae.mask_ratio 1.5"),
])  # fmt: skip
def test_bad_pairs_are_one_line(tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        main(tiny_args(tmp_path, "--objective", "supervised", *flags))
