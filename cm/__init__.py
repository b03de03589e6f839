"""Consistency models and EDM diffusion for CIFAR-10 (PyTorch)."""
