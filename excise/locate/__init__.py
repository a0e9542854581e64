"""Locate: find the sites that carry a domain's knowledge. Each method returns an Attribution or its own result.

Methods (one module each): :mod:`~excise.locate.activation_patching` (measured ablation effects, batched),
:mod:`~excise.locate.attribution_patching` (gradient estimate), :mod:`~excise.locate.integrated_gradients`,
:mod:`~excise.locate.causal_tracing` (ROME-style corrupt-and-restore), :mod:`~excise.locate.circuits` (EAP and
EAP-IG edge scores), :mod:`~excise.locate.sae` (SAE features as sites), and :mod:`~excise.locate.validate`
(estimates against measured effects). :mod:`~excise.locate.outliers` finds the massive-activation neurons
whose first-order scores cannot be trusted. :mod:`~excise.locate.planted` builds tiny models whose knowledge sites are
known by construction.
"""

from excise.locate.activation_patching import SiteEffects, activation_patching, measure_hooks, measure_sites
from excise.locate.attribution import Attribution, rank_by_selectivity
from excise.locate.attribution_patching import attribution_patching, attribution_patching_multi, fact_attributions
from excise.locate.causal_tracing import CausalTrace, FactTrace, causal_tracing
from excise.locate.circuits import Circuit, circuit_faithfulness, edge_attribution_patching, run_circuit
from excise.locate.integrated_gradients import ig_completeness, integrated_gradients
from excise.locate.metric import METRICS, Metric
from excise.locate.outliers import massive_activation_neurons
from excise.locate.planted import PlantedModel, planted_model
from excise.locate.reference import REFERENCES, Reference
from excise.locate.sae import (
    SAETrainingSettings,
    SparseAutoencoder,
    feature_frequencies,
    top_contexts,
    train_sae,
)
from excise.locate.validate import SUMMARY_COLUMNS, Validation, compare, validate

__all__ = [
    "METRICS",
    "REFERENCES",
    "SUMMARY_COLUMNS",
    "Attribution",
    "CausalTrace",
    "Circuit",
    "FactTrace",
    "Metric",
    "PlantedModel",
    "Reference",
    "SAETrainingSettings",
    "SiteEffects",
    "SparseAutoencoder",
    "Validation",
    "activation_patching",
    "attribution_patching",
    "attribution_patching_multi",
    "causal_tracing",
    "circuit_faithfulness",
    "compare",
    "edge_attribution_patching",
    "fact_attributions",
    "feature_frequencies",
    "ig_completeness",
    "integrated_gradients",
    "massive_activation_neurons",
    "measure_hooks",
    "measure_sites",
    "planted_model",
    "rank_by_selectivity",
    "run_circuit",
    "top_contexts",
    "train_sae",
    "validate",
]
