"""voltacache: compile Stable Diffusion to ONNX / TensorRT engines and serve it from Triton with caching."""

__version__ = "0.1.0"
