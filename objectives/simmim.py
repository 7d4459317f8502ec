"""SimMIM: a simple framework for masked image modeling (Xie et al., CVPR 2022, arXiv 2111.09886), as the paper and
its official code (microsoft/SimMIM, data/data_simmim.py and models/simmim.py) do it.

Masks are drawn in square blocks of mask_patch_size pixels (32 px at 192-224 px with 16-px ViT patches; section
3.1, "Masking strategy"), ceil(mask_ratio x blocks) of them per image (ratio 0.6 for ViT, Table 3). The learnable
mask token replaces the masked patch embeddings in the encoder, which sees every position (section 3.2). One linear
layer predicts each patch's raw pixels from its output token (the official 1x1 convolution and pixel shuffle,
section 3.3), and the loss is the L1 distance on the masked pixels only (section 3.4), on the normalised image.

One difference, a choice: the backbone is a plain timm ViT with its learned absolute position embeddings, which
SimMIM adds before the encoder; the official ViT configuration has none and a relative position bias in every block
instead (models/vision_transformer.py, use_rel_pos_bias), which a plain timm VisionTransformer does not have, so the
backbone would no longer export and fine-tune as one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from einops import rearrange, repeat
from torch import nn

from ssvit.objectives import register
from ssvit.objectives.base import PatchTokens, PixelReconstruction, StepOutput, patchify, save_reconstructions
from ssvit.errors import UsageError, check_ranges


def block_mask(batch: int, grid: tuple[int, int], block: int, ratio: float, device) -> torch.Tensor:
    """(B, N) 1 for masked patches: ceil(ratio x blocks) random blocks of block x block patches per image (the
    official MaskGenerator: mask_count = ceil(token_count x mask_ratio) of the blocks)."""
    rows, cols = grid[0] // block, grid[1] // block
    count = math.ceil(rows * cols * ratio)
    picked = torch.rand(batch, rows * cols, device=device).argsort(dim=1)[:, :count]
    blocks = torch.zeros(batch, rows * cols, device=device).scatter_(1, picked, 1.0)
    return rearrange(repeat(blocks, "b (r c) -> b (r p) (c q)", r=rows, p=block, q=block), "b h w -> b (h w)")


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the values (pixels x channels) of the masked patches only (the official loss: the
    sum over masked pixels, over their count, over the 3 channels). pred, target: (B, N, p*p*3); mask: (B, N)."""
    return ((pred - target).abs().sum(-1) * mask).sum() / (mask.sum() * pred.shape[-1] + 1e-5)


@register("simmim")
class SimMIM(PixelReconstruction):
    @dataclass
    class Options:
        mask_ratio: float = 0.6
        """Share of the mask blocks masked per image, ceil(mask_ratio x blocks) (paper: 0.6 for ViT-B)."""
        mask_patch_size: Optional[int] = None
        """Side of a mask block in pixels, a multiple of the patch size that divides the image (paper: 32 at 224 px
        with 16-px patches, i.e. 2 x 2 patches). Unset: 2 x 2 patches at any size."""
        mosaic_images: int = 8
        """Validation images in the PNG written at each evaluation (0: none)."""

    @classmethod
    def check_options(cls, cfg, options: Options) -> None:
        o = options
        check_ranges([
            ("mask_ratio", o.mask_ratio, 0 < o.mask_ratio < 1, "in (0, 1) (paper: 0.6)"),
            ("mask_patch_size", o.mask_patch_size, o.mask_patch_size is None or o.mask_patch_size >= 1, "1 or more pixels, or null"),
            ("mosaic_images", o.mosaic_images, o.mosaic_images >= 0, "0 (no figure) or more images"),
        ], "--simmim.")  # fmt: skip

    def __init__(self, backbone: nn.Module, num_classes: int, options: Options):
        super().__init__(backbone, num_classes, options)
        self.tokens = PatchTokens(backbone, "simmim")
        o, t = options, self.tokens
        size = t.patch * t.grid[0]
        block = o.mask_patch_size or 2 * t.patch
        if block % t.patch or size % block:
            raise UsageError(f"--simmim.mask_patch_size {block} must be a multiple of the {t.patch}-px patch that divides "
                             f"the {size}-px image, e.g. {2 * t.patch} (paper: 32 at 224 px with 16-px patches).")  # fmt: skip
        self.block = block // t.patch  # in patches
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(backbone.embed_dim, t.patch**2 * 3)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> StepOutput:
        t = self.tokens
        x = self.normalize(images)
        patches = t.embed(x)
        mask = block_mask(len(x), t.grid, self.block, self.options.mask_ratio, x.device)
        w = mask[..., None].to(patches.dtype)
        patches = patches * (1 - w) + self.mask_token.to(patches.dtype) * w  # before positions, as the official ViT
        encoded = t.encode(patches + t.positions())[:, t.num_prefix :]
        pred = self.head(encoded).float()
        target = patchify(x, t.patch)
        loss = masked_l1(pred, target, mask)
        return self.step_output(loss, pred, target, mask)

    @torch.no_grad()
    def on_evaluate(self, images: torch.Tensor, out_dir: Path, step: int) -> Optional[Path]:
        """The image, its masked input and the prediction on the masked blocks (ssvit.objectives.base.save_reconstructions)."""
        images = images[: self.options.mosaic_images]
        if len(images) == 0:
            return None
        out = self(images).outputs
        return save_reconstructions(self, images, out["pred"], out["mask"], out_dir / f"simmim_step{step:06d}.png")
