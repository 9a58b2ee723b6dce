"""e2e-wsi: end-to-end multiple-instance learning on whole-slide images (ResNet encoder + ABMILX)."""

__version__ = "0.1.0"
