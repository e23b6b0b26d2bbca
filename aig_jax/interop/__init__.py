"""Weights from and to other frameworks: PyTorch (the reference code, torchvision)."""
