"""ssvit: self-supervised pretraining of Vision Transformers with masked patch prediction (ViT paper, App. B.1.2)."""

__version__ = "0.2.0"
