"""The exported model folder's format, one definition read by the exporter
(:mod:`model.export`, PyTorch) and the service's engine (:mod:`service.engine`, no PyTorch).
"""

__all__ = ["MANIFEST_FORMAT", "MANIFEST_VERSION", "MANIFEST_FILE", "WEIGHTS_FILE"]

MANIFEST_FORMAT = "dsmi-onnx"
MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.bin"  # every graph's large tensors, each stored once
