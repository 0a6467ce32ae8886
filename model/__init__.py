"""The DSMI network (Deep Spatially Multiplicative Integration) and its baselines, in PyTorch.

Names are imported on first use (PEP 562) so that torch-free parts of the package, such as
:mod:`model.preprocess` which the ONNX-only service uses, do not pull in PyTorch.
"""

from importlib import import_module

_EXPORTS = {
    "VARIANTS": "factory", "VariantSpec": "factory", "build_model": "factory",
    "list_variants": "factory", "variant_spec": "factory",
    "binomial_deviance": "loss", "batch_hard_triplet": "loss",
    "MultiplicativeGate": "fusion", "HadamardFusion": "fusion", "BilinearFusion": "fusion",
    "FourDirectionRecurrence": "pooling", "IRNNLayer": "pooling", "StackedIRNN": "pooling",
    "SpatialPyramidPooling": "pooling", "GlobalAveragePooling": "pooling",
    "StackedConv": "pooling",
    "VGG16Trunk": "trunks", "VGGMTrunk": "trunks", "SmallTrunk": "trunks",
    "MatchingNetwork": "network", "TwoStreamMatchingNetwork": "network", "FCCNN": "network",
    "StreamFeatures": "network", "EmbeddingFeatures": "network",
    "WeightsNotFoundError": "weights",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
