"""Deployment: one exported file (ONNX or TorchScript) from image tensor to anomaly map and image
score. Scoring that file without the training stack is the `aaclip_score` package; this package
adds exporting and the TorchScript backend.

This package's ``__init__`` imports nothing, so ``aaclip_core.deploy.predict`` loads without torch.
"""
