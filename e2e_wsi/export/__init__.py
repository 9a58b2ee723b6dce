"""Trained models out of Python and Lightning: ``e2e-wsi export`` (ONNX, TorchScript) and the runtime
that ``predict --onnx`` uses (:mod:`e2e_wsi.export.runtime`, no Lightning import)."""
