"""PyTorch → ONNX → TensorRT: the backbone, the heads, their training and every conversion check."""
