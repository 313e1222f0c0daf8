"""Deployment: one exported file (ONNX or TorchScript) from image tensor to anomaly map and image
score, and the scorer that runs it without the training stack.

This package's ``__init__`` imports nothing, so ``aaclip_core.deploy.scorer`` can be imported where
only numpy, PIL and onnxruntime (or torch, for TorchScript) are installed.
"""
