"""The matching service: FastAPI over the exported ONNX network, gallery cache in Redis."""
