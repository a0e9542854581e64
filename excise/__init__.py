"""excise: locate where a language model keeps a piece of knowledge, remove it, and verify that it stays gone.

The stages live in subpackages with their own ``__all__``: :mod:`excise.locate`, :mod:`excise.edit` and
:mod:`excise.verify`. This module re-exports the types and entry points most scripts start from.
"""

from excise.data.facts import Domain, Fact
from excise.edit.base import Edit, load_edit
from excise.locate.attribution import Attribution
from excise.models import load as load_model
from excise.sites import Site
from excise.study import StudyConfig, run_study
from excise.study import load_study_domain as load_domain
from excise.verify.report import Report

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "Domain",
    "Edit",
    "Fact",
    "Report",
    "Site",
    "StudyConfig",
    "load_domain",
    "load_edit",
    "load_model",
    "run_study",
]
