"""The exported model folder's format, one definition read by the exporter
(:mod:`model.export`, PyTorch) and the service's engine (:mod:`service.engine`, no PyTorch).
"""

__all__ = ["MANIFEST_FORMAT", "MANIFEST_VERSION", "MANIFEST_FILE", "WEIGHTS_FILE",
           "EMBEDDING_FIELD"]

MANIFEST_FORMAT = "dsmi-onnx"
MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.bin"  # every graph's large tensors, each stored once
# The per-image embedding FC(g) that every variant exports on both sides (probe and gallery):
# stage one of two-stage retrieval ranks a gallery by its cosine (model/retrieval.py).
EMBEDDING_FIELD = "embedding"
