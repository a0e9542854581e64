"""Models: load one by name, offline first (see :mod:`excise.models.loading`), and the excise cache.

``excise.models.load()`` returns the default model, SmolLM2-135M-Instruct, built from a GGUF file shipped on PyPI,
with no model hub involved.
"""

from excise.models.gguf import OFFLINE_MODELS, ModelDownloadError, OfflineModel
from excise.models.hub import ModelUnavailableError
from excise.models.loading import DEFAULT_MODEL, load, load_hf

__all__ = [
    "DEFAULT_MODEL",
    "OFFLINE_MODELS",
    "ModelDownloadError",
    "ModelUnavailableError",
    "OfflineModel",
    "load",
    "load_hf",
]
