"""Edits: turn located sites into a change that can be inspected, saved, undone, shipped and attacked."""

from excise.edit.ablation import Ablation, ablate, mean_activations
from excise.edit.base import Edit, load_edit, model_signature
from excise.edit.sequence import EditSequence

__all__ = ["Ablation", "Edit", "EditSequence", "ablate", "load_edit", "mean_activations", "model_signature"]
