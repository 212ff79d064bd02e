"""The SVD-analysis notebook runs top to bottom (nbclient, python3 kernel, 120 s per cell)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebooks" / "svd_analysis.ipynb"


def test_svd_analysis_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # spectra, effective rank, phi grid, seeds heatmap, experts
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "same metrics as from the model: True" in text
