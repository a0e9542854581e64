"""Models: load one by name, offline first (see :mod:`excise.models.loading`), and the excise cache.

``excise.models.load()`` returns the default model, SmolLM2-135M-Instruct, built from a GGUF file shipped on PyPI,
with no model hub involved. ``load_organism()`` trains (or reads from the cache) the small model organism with
ground truth: see :mod:`excise.models.organism`.
"""

from excise.models.gguf import OFFLINE_MODELS, ModelDownloadError, OfflineModel
from excise.models.hub import ModelUnavailableError
from excise.models.loading import DEFAULT_MODEL, load, load_hf
from excise.models.organism import Organism, OrganismConfig, load_organism, planted_neurons

__all__ = [
    "DEFAULT_MODEL",
    "OFFLINE_MODELS",
    "ModelDownloadError",
    "ModelUnavailableError",
    "OfflineModel",
    "Organism",
    "OrganismConfig",
    "load",
    "load_hf",
    "load_organism",
    "planted_neurons",
]
