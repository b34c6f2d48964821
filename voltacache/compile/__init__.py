"""Making engines: checkpoints loaded offline, the components exported to ONNX (validated against PyTorch,
linted for TensorRT, the U-Nets and the VAE decoder int8-quantized on request) and built into engines by a backend."""
