"""Execute notebooks/01_locate.ipynb end to end on the default model (a few minutes on two CPU cores)."""

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_locate.ipynb"


@pytest.mark.slow
def test_locate_notebook_runs():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    last = notebook.cells[-1]["outputs"][0]["data"]["text/plain"]
    assert "spearman" in last
    assert "sae_feature" in last
