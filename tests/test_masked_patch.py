"""Masked patch prediction contracts (ViT paper, App. B.1.2)."""

import math

import pytest
import timm
import torch

from ssvit.objectives.masked_patch import MaskedPatch, class_color, color_class, corrupt, patch_targets, quantize
from ssvit.models import create_backbone


def tiny_objective(**options) -> MaskedPatch:
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_patch16_224", 16, {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2})
    return MaskedPatch(backbone, 10, MaskedPatch.Options(**options))


# ---- targets -------------------------------------------------------------------------------------------------


def test_constant_colour_image_gives_the_hand_computed_class():
    # r = 0.3 -> bin 2 (0.3 * 8 = 2.4), g = 0.6 -> bin 4 (4.8), b = 0.95 -> bin 7 (7.6): 2*64 + 4*8 + 7 = 167
    img = torch.tensor([0.3, 0.6, 0.95]).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    classes = patch_targets(img, patch=4, target="mean_color")
    assert classes.shape == (1, 16) and (classes == 167).all()


def test_bins_at_zero_one_eighth_and_one():
    assert quantize(torch.tensor([0.0, 1 / 8, 1.0, 1 / 8 - 1e-6, 0.999]), bits=3).tolist() == [0, 1, 7, 0, 7]
    assert color_class(torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1 / 8, 0.0, 1.0]]), bits=3).tolist() == [0, 511, 71]
    assert color_class(torch.tensor([1.0, 1.0, 1.0]), bits=2).item() == 63  # bit depth is configurable


def test_checkerboard_patch_gives_the_expected_16_downsampled_classes():
    # A 4x4 pixel checkerboard of black and white in a 4px patch: each 1x1 cell is one square.
    board = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2  # (4, 4): 0 1 0 1 / 1 0 1 0 ...
    img = board.float().expand(1, 3, 4, 4)
    classes = patch_targets(img, patch=4, target="downsampled", grid=4)
    assert classes.shape == (1, 1, 16)
    assert classes[0, 0].tolist() == [511 if v else 0 for v in board.flatten().tolist()]
    # At 8px patches each cell averages 2x2 pixels of one square of a 2px-square board: the same pattern.
    img8 = board.repeat_interleave(2, 0).repeat_interleave(2, 1).float().expand(1, 3, 8, 8)
    assert patch_targets(img8, 8, "downsampled").flatten().tolist() == classes.flatten().tolist()


def test_pixel_target_and_colour_decoding():
    img = torch.rand(2, 3, 8, 8)
    pixels = patch_targets(img, 4, "pixels")
    assert pixels.shape == (2, 4, 48) and torch.equal(pixels[0, 0].view(4, 4, 3).permute(2, 0, 1), img[0, :, :4, :4])
    classes = torch.arange(512)
    assert torch.equal(color_class(class_color(classes, 3), 3), classes)


# ---- corruption ----------------------------------------------------------------------------------------------


def test_unselected_tokens_are_bit_identical_and_exactly_half_are_selected():
    torch.manual_seed(0)
    tokens = torch.randn(8, 64, 16)
    out, selected, kind, positions = corrupt(tokens, torch.zeros(16), 0.5, 0.8, 0.1)
    assert torch.equal(positions, selected.nonzero()[:, 1].view(8, 32))  # the selected patches, ascending
    assert (selected.sum(1) == 32).all()
    assert torch.equal(out[~selected], tokens[~selected])
    assert torch.equal(out[kind == 3], tokens[kind == 3])  # "unchanged" corrupted tokens too
    assert (out[kind == 1] == 0).all()  # mask token
    assert ((kind > 0) == selected).all()


def test_selection_rate_and_80_10_10_split_over_a_large_batch():
    torch.manual_seed(0)
    tokens = torch.randn(4096, 64, 4)  # CIFAR at patch 4: 64 patches
    _, selected, kind, _ = corrupt(tokens, torch.zeros(4), 0.5, 0.8, 0.1)
    n_sel = selected.sum().item()
    assert abs(n_sel / selected.numel() - 0.5) < 0.01
    shares = [(kind == k).sum().item() / n_sel for k in (1, 2, 3)]
    assert abs(shares[0] - 0.8) < 0.01 and abs(shares[1] - 0.1) < 0.01 and abs(shares[2] - 0.1) < 0.01
    _, selected15, _, _ = corrupt(tokens, torch.zeros(4), 0.15, 0.8, 0.1)
    assert (selected15.sum(1) == round(0.15 * 64)).all()


def test_random_replacement_is_another_patch_of_the_batch():
    torch.manual_seed(0)
    tokens = torch.arange(2 * 10, dtype=torch.float).view(2, 10, 1).expand(2, 10, 3).contiguous()
    out, _, kind, _ = corrupt(tokens, torch.full((3,), -1.0), 1.0, 0.0, 1.0)
    assert (kind == 2).all()
    assert not (out == tokens).all(-1).any()  # never the patch itself
    assert set(out[..., 0].flatten().tolist()) <= set(range(20))


def test_same_seed_same_corruption():
    tokens = torch.randn(4, 16, 8)
    torch.manual_seed(3)
    a = corrupt(tokens, torch.zeros(8), 0.5, 0.8, 0.1)
    torch.manual_seed(3)
    b = corrupt(tokens, torch.zeros(8), 0.5, 0.8, 0.1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---- the objective -------------------------------------------------------------------------------------------


def test_mask_token_gets_a_gradient_and_initial_loss_is_near_ln_512():
    model = tiny_objective()
    torch.manual_seed(1)
    out = model(torch.rand(32, 3, 16, 16), torch.zeros(32, dtype=torch.long))
    assert abs(out.loss.item() - math.log(512)) < 0.1 * math.log(512)
    out.loss.backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_a_tiny_model_overfits_one_fixed_batch():
    model = tiny_objective()
    images = torch.rand(8, 3, 16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0)
    for _step in range(300):
        torch.manual_seed(0)  # the same corruption every step: a fixed batch
        out = model(images, torch.zeros(8, dtype=torch.long))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss.item() < 0.5 and out.logs["color_accuracy"].item() > 0.95


@pytest.mark.parametrize("target", ["mean_color", "downsampled", "pixels"])
def test_every_target_trains_and_reports_colour_accuracy(target):
    model = tiny_objective(target=target)
    out = model(torch.rand(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert 0 <= out.logs["color_accuracy"].item() <= 1
    metrics = model.make_metrics()
    model.eval()
    model.update_metrics(metrics, model(torch.rand(4, 3, 16, 16)).outputs)
    assert set(metrics.compute()) == {"loss", "color_accuracy", "baseline_majority", "baseline_context_mean"}


def test_context_mean_baseline_is_perfect_on_constant_images():
    model = tiny_objective().eval()
    metrics = model.make_metrics()
    images = torch.rand(6, 3, 1, 1).expand(6, 3, 16, 16).contiguous()
    model.update_metrics(metrics, model(images).outputs)
    assert metrics.compute()["baseline_context_mean"].item() == 1.0


def test_a_model_without_patch_tokens_is_a_clear_error():
    bit = timm.create_model("resnetv2_50x1_bit", num_classes=0)
    with pytest.raises(ValueError, match="patch tokens.*supervised"):
        MaskedPatch(bit, 10, MaskedPatch.Options())


def test_hybrid_vit_is_corrupted_in_embedding_space():
    torch.manual_seed(0)
    hybrid = create_backbone("vit_tiny_r_s16_p8_224", 64, {"depth": 1})
    model = MaskedPatch(hybrid, 10, MaskedPatch.Options())
    out = model(torch.rand(2, 3, 64, 64), torch.zeros(2, dtype=torch.long))
    out.loss.backward()
    assert model.mask_token.grad is not None


def test_mosaic_is_written(tmp_path):
    model = tiny_objective().eval()
    path = model.on_evaluate(torch.rand(4, 3, 16, 16), tmp_path, step=7)
    assert path.exists() and path.stat().st_size > 0
