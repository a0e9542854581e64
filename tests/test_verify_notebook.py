from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "03_verify.ipynb"


@pytest.mark.slow
def test_verify_notebook_runs():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from excise.models import ModelDownloadError, ModelUnavailableError, load

    try:
        load()
    except (ModelUnavailableError, ModelDownloadError) as error:
        pytest.skip(f"the default model is not available offline: {error}")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3").execute(cwd=str(NOTEBOOK.parent))
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    assert any("worst-case recovery" in output.get("text", "") for output in outputs)
