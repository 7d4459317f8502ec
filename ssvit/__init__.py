"""ssvit: self-supervised pretraining of Vision Transformers (masked patch prediction, MAE, SimMIM, DINO) beside supervised and semi-supervised training, compared at equal compute."""

__version__ = "0.2.0"
