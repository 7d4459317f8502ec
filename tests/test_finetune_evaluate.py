"""Fine-tuning and frozen-feature evaluation contracts (ViT paper, sections 3.2 and 4.1)."""

import json

import pytest
import torch

from ssvit.evaluate import fewshot_accuracy, main as evaluate_main, ridge_fit, ridge_predict
from ssvit.finetune import main as finetune_main
from ssvit.models import create_backbone, load_backbone_weights, resample_pos_embed
from ssvit.pretrain import main as pretrain_main

from conftest import tiny_args

VIT = ("vit_tiny_patch16_224", {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2})


def test_closed_form_few_shot_solver_matches_a_direct_solve():
    torch.manual_seed(0)
    x, y = torch.randn(40, 16, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    lam = 0.7
    w = ridge_fit(x, y, lam)
    # The same regularised problem, stacked for lstsq: [x 1; sqrt(lam) I 0] w = [y; 0] (bias unregularised).
    a = torch.cat([torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1),
                   torch.cat([lam**0.5 * torch.eye(16, dtype=torch.float64), torch.zeros(16, 1, dtype=torch.float64)], 1)])  # fmt: skip
    b = torch.cat([y, torch.zeros(16, 3, dtype=torch.float64)])
    direct = torch.linalg.lstsq(a, b).solution
    assert torch.allclose(w, direct, atol=1e-4)
    assert ridge_predict(w, x).shape == (40, 3)


def test_few_shot_is_perfect_on_linearly_separable_data():
    torch.manual_seed(0)
    centers = torch.eye(5) * 10
    labels = torch.arange(5).repeat(40)
    feats = centers[labels] + 0.1 * torch.randn(200, 5)
    for shots in (1, 5):
        assert fewshot_accuracy(feats, labels, feats, labels, shots, seed=0, num_classes=5) == 1.0


def test_position_embedding_interpolation():
    small = create_backbone(VIT[0], 16, VIT[1])
    same = resample_pos_embed(small.pos_embed.detach(), small)
    assert torch.equal(same, small.pos_embed.detach())
    big = create_backbone(VIT[0], 32, VIT[1])
    resampled = resample_pos_embed(small.pos_embed.detach(), big)
    assert resampled.shape == big.pos_embed.shape == (1, 1 + 64, 32)
    assert torch.equal(resampled[:, 0], small.pos_embed.detach()[:, 0])  # class token kept
    load_backbone_weights(big, small.state_dict(), "small")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A masked-patch and a supervised checkpoint of the same tiny ViT."""
    out = {}
    for objective in ("masked_patch", "supervised"):
        tmp = tmp_path_factory.mktemp(objective)
        pretrain_main(tiny_args(tmp, "--max_steps", "2", "--fewshot_steps", "0", "--img_size", "32", objective=objective))
        out[objective] = tmp / "run/checkpoints/step_000002"
    return out


@pytest.mark.parametrize("objective", ["masked_patch", "supervised"])
def test_checkpoints_fine_tune_end_to_end(checkpoints, tmp_path, objective):
    result = finetune_main(["--init", str(checkpoints[objective]), "--data", "synthetic:600", "--max_steps", "3",
                            "--batch_size", "16", "--mixed_precision", "no", "--report_to", "[]", "--cpu_threads", "1",
                            "--fewshot_steps", "0", "--output_dir", str(tmp_path / "ft")])  # fmt: skip
    assert result["steps"] == 3 and "val/top1" in result and "val/top5" in result
    saved = json.loads((tmp_path / "ft/results.json").read_text())
    assert saved["objective"] == "supervised"


def test_fine_tuning_starts_from_a_zero_head_with_the_pretrained_backbone(checkpoints, tmp_path):
    from ssvit.config import finetune_defaults, parse
    from ssvit.models import read_state_dict
    from ssvit.train import build_objective

    argv = ["--init", str(checkpoints["masked_patch"])]
    run = parse(argv, defaults=finetune_defaults(argv))
    assert run.train.optimizer == "sgd" and run.train.weight_decay == 0 and run.train.max_grad_norm == 1.0
    model = build_objective(run, num_classes=10)
    assert (model.head.weight == 0).all() and (model.head.bias == 0).all()
    saved = read_state_dict(checkpoints["masked_patch"])
    assert torch.equal(model.backbone.pos_embed, saved["backbone.pos_embed"])


def test_fine_tuning_at_twice_the_resolution(checkpoints, tmp_path):
    result = finetune_main(["--init", str(checkpoints["masked_patch"]), "--img_size", "64", "--data", "synthetic:600",
                            "--max_steps", "2", "--batch_size", "16", "--mixed_precision", "no", "--report_to", "[]",
                            "--cpu_threads", "1", "--fewshot_steps", "0", "--output_dir", str(tmp_path / "ft")])  # fmt: skip
    assert result["steps"] == 2


def test_evaluate_command_writes_json_and_table(checkpoints, tmp_path):
    out = tmp_path / "eval.json"
    result = evaluate_main(["--init", str(checkpoints["masked_patch"]), "--shots", "1", "5", "--seeds", "2",
                            "--output", str(out)])  # fmt: skip
    assert result["representation"] == "mean"  # masked-patch checkpoints: mean patch token by default
    for key in ("fewshot_1shot", "fewshot_5shot", "fewshot_5shot_std", "linear_probe", "knn20"):
        assert 0 <= result[key] <= 1, key
    assert json.loads(out.read_text()) == result and "fewshot_5shot" in out.with_suffix(".md").read_text()


def test_fine_tuning_from_an_exported_backbone_with_layer_decay(checkpoints, tmp_path):
    from ssvit.export import main as export_main

    exported = export_main([str(checkpoints["masked_patch"]), "--out", str(tmp_path / "exported")])
    result = finetune_main(["--init", str(exported), "--img_size", "32", "--data", "synthetic:600", "--max_steps", "2",
                            "--batch_size", "16", "--mixed_precision", "no", "--report_to", "[]", "--cpu_threads", "1",
                            "--layer_decay", "0.75", "--fewshot_steps", "0", "--output_dir", str(tmp_path / "ft")])  # fmt: skip
    assert result["steps"] == 2 and result["best"]["metric"] == "top1"
