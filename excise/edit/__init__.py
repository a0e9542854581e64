"""Edits: turn located sites into a change that can be inspected, saved, undone, shipped and attacked."""

from excise.edit.ablation import Ablation, ablate, mean_activations, token_activations
from excise.edit.base import Edit, load_edit, model_signature
from excise.edit.direction import (
    Direction,
    DirectionRemoval,
    given_direction,
    hook_activations,
    mean_difference_direction,
    probe_direction,
    remove_direction,
    residual_writers,
)
from excise.edit.memit import default_layers, memit
from excise.edit.metrics import RewriteScores, generation_entropy, greedy_generations, ngram_entropy, rewrite_scores
from excise.edit.rewrite import (
    DEFAULT_PREFIXES,
    DeltaSettings,
    EditRejectedError,
    RewriteRequest,
    key_second_moment,
    optimize_delta,
    subject_keys,
    subject_position,
)
from excise.edit.rome import default_layer, rank_one_update, rome, rome_in_turn
from excise.edit.sae_features import (
    FeatureSlice,
    SAEFeatureEdit,
    WeightFormError,
    sae_feature_edit,
    weight_form_error,
)
from excise.edit.sequence import EditSequence
from excise.edit.unlearning import (
    DEFAULTS as UNLEARN_DEFAULTS,
)
from excise.edit.unlearning import (
    UnlearnSettings,
    gradient_ascent,
    gradient_difference,
    npo,
    rmu,
    unlearn,
)
from excise.edit.weights import WeightDelta

__all__ = [
    "DEFAULT_PREFIXES",
    "UNLEARN_DEFAULTS",
    "Ablation",
    "DeltaSettings",
    "Direction",
    "DirectionRemoval",
    "Edit",
    "EditRejectedError",
    "EditSequence",
    "FeatureSlice",
    "RewriteRequest",
    "RewriteScores",
    "SAEFeatureEdit",
    "UnlearnSettings",
    "WeightDelta",
    "WeightFormError",
    "ablate",
    "default_layer",
    "default_layers",
    "generation_entropy",
    "given_direction",
    "gradient_ascent",
    "gradient_difference",
    "greedy_generations",
    "hook_activations",
    "key_second_moment",
    "load_edit",
    "mean_activations",
    "mean_difference_direction",
    "memit",
    "model_signature",
    "ngram_entropy",
    "npo",
    "optimize_delta",
    "probe_direction",
    "rank_one_update",
    "remove_direction",
    "residual_writers",
    "rewrite_scores",
    "rmu",
    "rome",
    "rome_in_turn",
    "sae_feature_edit",
    "subject_keys",
    "subject_position",
    "token_activations",
    "unlearn",
    "weight_form_error",
]
