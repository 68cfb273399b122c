"""DPPMG: discrete preference learning for personalized multimodal generation."""

__version__ = "0.1.0"
