"""Evaluation and deployment: NMS, metrics, plots, runtimes (onnxruntime), export."""
