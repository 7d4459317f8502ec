"""Fine-tuning and frozen-feature evaluation contracts (ViT paper, sections 3.2 and 4.1)."""

import json

import pytest
import torch

import numpy as np

from ssvit.evaluate import main as evaluate_main
from ssvit.features import LsqReadout, fewshot_accuracy, ridge_fit
from ssvit.finetune import main as finetune_main
from ssvit.models import create_backbone, load_backbone_weights, resample_pos_embed
from ssvit.pretrain import main as pretrain_main

from conftest import tiny_args

VIT = ("vit_tiny_patch16_224", {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2})


@pytest.mark.parametrize("n, d", [(40, 16), (12, 50)], ids=["primal", "dual"])
def test_closed_form_few_shot_solver_matches_a_direct_solve(n, d):
    torch.manual_seed(0)
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)
    lam = 0.7
    w = ridge_fit(x, y, lam)
    # The same regularised problem, stacked for lstsq: [x; sqrt(lam) I] w = [y; 0].
    a = torch.cat([x, lam**0.5 * torch.eye(d, dtype=torch.float64)])
    direct = torch.linalg.lstsq(a, torch.cat([y, torch.zeros(d, 3, dtype=torch.float64)])).solution
    assert torch.allclose(w, direct, atol=1e-8)


def big_vision_reference(train_x, train_y, test_x, test_y, shots, seed, num_classes, l2_reg):
    """Written from big_vision's evaluators/fewshot_lsr.py as described there: numpy shots per class, whitening
    with the shots' statistics, a bias feature of 100, {-1, 1} targets, and the eigendecomposition of x^T x
    (N >= D) or x x^T (D > N)."""
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(np.where(train_y == c)[0])[:shots] for c in range(num_classes)])
    x, y = train_x[idx], train_y[idx]
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
    pad = lambda a: np.pad((a - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)  # noqa: E731
    x, targets = pad(x), 2.0 * np.eye(num_classes)[y] - 1.0
    if x.shape[0] >= x.shape[1]:
        eigs, q = np.linalg.eigh(x.T @ x)
        lhs, rhs = q, q.T @ (x.T @ targets)
    else:
        eigs, q = np.linalg.eigh(x @ x.T)
        lhs, rhs = x.T @ q, q.T @ targets
    w = (lhs / (eigs + l2_reg)[None]) @ rhs
    return float(np.mean(np.argmax(pad(test_x) @ w, 1) == test_y))


def test_few_shot_matches_big_visions_evaluator_on_synthetic_features():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 192))
    train_y, test_y = rng.integers(0, 10, 3000), rng.integers(0, 10, 1000)
    train_x = centers[train_y] + 3.0 * rng.normal(size=(3000, 192))
    test_x = centers[test_y] + 3.0 * rng.normal(size=(1000, 192))
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    for shots in (1, 5, 10, 25):  # 10 to 250 shots against 193 features: the dual and the primal solve
        for seed in (0, 1):
            ours = fewshot_accuracy(t(train_x).float(), t(train_y), t(test_x).float(), t(test_y), shots, seed, 10)
            theirs = big_vision_reference(train_x.astype(np.float32).astype(np.float64), train_y, test_x.astype(np.float32),
                                          test_y, shots, seed, 10, 2.0**10)  # fmt: skip
            assert abs(ours - theirs) <= 1e-4, (shots, seed, ours, theirs)
    # More shots do not hurt on this problem (with lambda = 1 on raw features, 25-shot fell below 10-shot).
    accs = [fewshot_accuracy(t(train_x), t(train_y), t(test_x), t(test_y), n, 0, 10) for n in (1, 5, 10, 25)]
    assert accs == sorted(accs)


def test_few_shot_is_perfect_on_linearly_separable_data():
    torch.manual_seed(0)
    centers = torch.eye(5) * 10
    labels = torch.arange(5).repeat(40)
    feats = centers[labels] + 0.1 * torch.randn(200, 5)
    for shots in (1, 5):
        assert fewshot_accuracy(feats, labels, feats, labels, shots, seed=0, num_classes=5) == 1.0


@pytest.mark.parametrize("n, d", [(60, 8), (20, 30)], ids=["primal", "dual"])
def test_the_read_out_chooses_l2_by_leave_one_out_as_refitting_without_each_image_would(n, d):
    """LsqReadout scores each L2 by leave-one-out in closed form (one eigendecomposition); refitting n times without each image
    (its standardisation kept, as the closed form keeps it) gives the same accuracies, so the same choice."""
    torch.manual_seed(0)
    labels = torch.arange(n) % 3
    feats = torch.randn(n, d) + 1.5 * torch.eye(3, d)[labels]
    grid = (0.01, 1.0, 100.0, 1e4)
    readout = LsqReadout.fit(feats, labels, 3, grid)
    x = (feats.double() - readout.mean) / readout.std
    x = torch.cat([x, torch.full((n, 1), 100.0, dtype=x.dtype)], 1)
    targets = torch.nn.functional.one_hot(labels, 3).double() * 2 - 1
    for l2, closed in zip(grid, readout.loo_accuracies):
        keep = lambda i: torch.arange(n) != i  # noqa: E731
        right = sum(int((x[i] @ ridge_fit(x[keep(i)], targets[keep(i)], l2)).argmax() == labels[i]) for i in range(n))
        assert closed == pytest.approx(right / n, abs=1e-9), l2
    best = max(readout.loo_accuracies)
    assert readout.l2_reg == max(l2 for l2, a in zip(grid, readout.loo_accuracies) if a == best)  # ties: the stronger L2
    assert torch.equal(readout.predict(feats), (x @ ridge_fit(x, targets, readout.l2_reg)).argmax(1))
    chunked = LsqReadout.fit(feats, labels, 3, grid, chunk=7)  # many images are read a chunk of rows at a time
    assert chunked.loo_accuracies == readout.loo_accuracies and chunked.l2_reg == readout.l2_reg
    torch.testing.assert_close(chunked.weights, readout.weights)


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


def test_lsq_head_starts_fine_tuning_from_the_least_squares_read_out_once(checkpoints, tmp_path, monkeypatch):
    """--supervised.lsq_head (LP-FT): before the first step the head is the least-squares read-out of the frozen
    features of the labelled images, the same scores as LsqReadout's up to the head's float32; a resumed run keeps the
    head its checkpoint holds (the read-out is not fitted again); refused where it cannot run."""
    from ssvit.config import finetune_defaults, parse
    from ssvit.data import load_splits
    from ssvit.errors import UsageError
    from ssvit.objectives.supervised import Supervised
    from ssvit.train import build_objective

    argv = ["--init", str(checkpoints["masked_patch"]), "--data", "synthetic:300", "--supervised.lsq_head", "true",
            "--label_fraction", "0.5", "--mixed_precision", "no"]  # fmt: skip
    run = parse(argv, defaults=finetune_defaults(argv))
    model = build_objective(run, num_classes=10)
    splits = load_splits(run.train)
    model.on_train_start(splits.train)
    stored = splits.train.augmented(None)  # the images as stored, not the training crops
    images = torch.stack([stored[i]["image"] for i in range(len(stored))]).float() / 255
    labels = torch.tensor([stored[i]["label"] for i in range(len(stored))])
    with torch.no_grad():
        features = model.eval().backbone(model.normalize(images))
        readout = LsqReadout.fit(features, labels, 10)
        expected = torch.cat([(features.double() - readout.mean) / readout.std, torch.full((len(labels), 1), 100.0, dtype=torch.float64)], 1) @ readout.weights
        torch.testing.assert_close(model.head(features).double(), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.head(features).argmax(1), readout.predict(features))

    fits = []
    real = Supervised.on_train_start
    monkeypatch.setattr(Supervised, "on_train_start", lambda self, images: (fits.append(1), real(self, images)))
    flags = [*argv, "--batch_size", "16", "--cpu_threads", "1", "--fewshot_steps", "0", "--report_to", "[]",
             "--save_steps", "1", "--output_dir", str(tmp_path / "ft")]  # fmt: skip
    finetune_main([*flags, "--max_steps", "2"])
    import shutil

    shutil.rmtree(tmp_path / "ft/checkpoints/step_000002")  # as if stopped after step 1's checkpoint
    (tmp_path / "ft/results.json").unlink()
    assert finetune_main([*flags, "--max_steps", "2", "--resume", "auto"])["steps"] == 2
    assert fits == [1]
    with pytest.raises(UsageError, match=r"--supervised\.lsq_head True: must be used with a linear head"):
        finetune_main([*flags, "--supervised.head", "mlp_tanh", "--output_dir", str(tmp_path / "mlp")])


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
    for key in ("fewshot_1shot", "fewshot_5shot", "fewshot_5shot_std", "linear_probe", "knn20", "knn20_weighted"):
        assert 0 <= result[key] <= 1, key
    assert json.loads(out.read_text()) == result and "fewshot_5shot" in out.with_suffix(".md").read_text()


def test_evaluate_lsq_is_the_studies_read_out_fitted_on_the_training_images(checkpoints, tmp_path, monkeypatch):
    """--lsq: the read-out that leads the budget studies (LsqReadout: every labelled image, L2 by leave-one-out),
    fitted on the same training features as the probe and scored on the validation features."""
    import ssvit.features

    extracted = []
    real = ssvit.features.extract_features
    monkeypatch.setattr(ssvit.features, "extract_features", lambda *a, **k: extracted.append(real(*a, **k)) or extracted[-1])
    result = evaluate_main(["--init", str(checkpoints["masked_patch"]), "--shots", "1", "--seeds", "1", "--lsq",
                            "--max_train", "300", "--output", str(tmp_path / "eval.json")])  # fmt: skip
    (tx, ty), (vx, vy) = extracted
    readout = LsqReadout.fit(tx, ty, 10)
    assert len(ty) == result["train_images"] == 300 and result["lsq_l2_reg"] == readout.l2_reg
    assert result["lsq"] == readout.predict(vx).eq(vy).double().mean().item()
    assert "lsq" in (tmp_path / "eval.md").read_text()
    assert "lsq" not in evaluate_main(["--init", str(checkpoints["masked_patch"]), "--shots", "1", "--seeds", "1",
                                       "--output", str(tmp_path / "plain.json")])  # fmt: skip


def test_fine_tuning_from_an_exported_backbone_with_layer_decay(checkpoints, tmp_path):
    from ssvit.export import main as export_main

    exported = export_main([str(checkpoints["masked_patch"]), "--out", str(tmp_path / "exported")])
    result = finetune_main(["--init", str(exported), "--img_size", "32", "--data", "synthetic:600", "--max_steps", "2",
                            "--batch_size", "16", "--mixed_precision", "no", "--report_to", "[]", "--cpu_threads", "1",
                            "--layer_decay", "0.75", "--fewshot_steps", "0", "--output_dir", str(tmp_path / "ft")])  # fmt: skip
    assert result["steps"] == 2 and result["best"]["metric"] == "top1"


def test_a_masked_patch_init_is_read_through_the_mean_patch_token_unless_chosen(checkpoints, tmp_path):
    """Masked patch never trains the class token's output, so a classifier on it pools the patch tokens; a
    supervised init keeps timm's class token, an explicit global_pool is kept, and the export carries the choice."""
    import timm

    from ssvit import objectives
    from ssvit.config import finetune_defaults, parse
    from ssvit.export import main as export_main

    def model_kwargs(objective, *extra):
        argv = ["--init", str(checkpoints[objective]), *extra]
        return parse(argv, defaults=finetune_defaults(argv)).train.model_kwargs

    assert model_kwargs("masked_patch") == {**VIT[1], **objectives.get("masked_patch").classifier_pooling, "global_pool": "avg"}
    assert "global_pool" not in model_kwargs("supervised")
    chosen = {**VIT[1], "global_pool": "token"}
    assert model_kwargs("masked_patch", "--model_kwargs", json.dumps(chosen)) == chosen
    finetune_main(["--init", str(checkpoints["masked_patch"]), "--data", "synthetic:600", "--max_steps", "2", "--batch_size", "16",
                   "--mixed_precision", "no", "--report_to", "[]", "--cpu_threads", "1", "--fewshot_steps", "0",
                   "--output_dir", str(tmp_path / "ft")])  # fmt: skip
    exported = export_main([str(tmp_path / "ft/checkpoints/step_000002"), "--out", str(tmp_path / "export"), "--with-head"])
    model = timm.create_model(f"local-dir:{exported}", pretrained=True)  # what a timm user gets
    assert model.global_pool == "avg" and isinstance(model.fc_norm, torch.nn.Identity)
    # The exported masked-patch backbone itself carries the pooling, so fine-tuning from it reads the same token.
    backbone = export_main([str(checkpoints["masked_patch"]), "--out", str(tmp_path / "backbone")])
    assert timm.create_model(f"local-dir:{backbone}", pretrained=True).global_pool == "avg"
    argv = ["--init", str(backbone)]
    assert parse(argv, defaults=finetune_defaults(argv)).train.model_kwargs["global_pool"] == "avg"
