"""Execute notebooks/02_edit.ipynb on the default model (a few minutes on two CPU cores)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "02_edit.ipynb"


@pytest.mark.slow
def test_edit_notebook_runs(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from tests.edit_models import default_model_or_skip

    default_model_or_skip()
    # The kernel imports excise from this checkout even when the package is not installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3").execute(cwd=str(NOTEBOOK.parent))
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    tables = [output["data"]["text/plain"] for output in outputs if "text/plain" in output.get("data", {})]
    assert any("NPO (10 steps)" in table and "forget" in table for table in tables)
