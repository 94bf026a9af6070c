"""The quickstart notebook runs top to bottom (small sizes), and is committed without outputs."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def test_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_NB_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("CURATE_NB_SAMPLES", "300")
    monkeypatch.setenv("CURATE_NB_EVAL_STEPS", "4")
    monkeypatch.setenv("CURATE_NB_EVAL_SEEDS", "1")
    monkeypatch.setenv("CURATE_NB_EVAL_BATCH", "32")
    monkeypatch.setenv("CURATE_NB_HELDOUT_PER_CLASS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend turns figures into outputs
    monkeypatch.setenv("RAY_ADDRESS", "")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "the score histogram, the examples and the evaluation plot"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "input samples 300 = kept" in text
    # Ray's tqdm.auto import and its widget check are silenced in the kernel (no ipywidgets here)
    assert "IProgress" not in text and "ipywidgets" not in text
    assert (tmp_path / "work" / "eval" / "eval.json").exists()
