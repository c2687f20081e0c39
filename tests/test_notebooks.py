"""Every notebook runs top to bottom at the small scale, and its .py and .ipynb twins hold the same cells."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0*.ipynb"))


def test_there_are_four_paired_notebooks():
    assert [p.stem for p in NOTEBOOKS] == ["01_quick_start", "02_feedback_noise_sweep", "03_credit_and_entropy", "04_promote_to_llm"]
    for nb_path in NOTEBOOKS:
        ipynb = jupytext.read(nb_path)
        py = jupytext.read(nb_path.with_suffix(".py"))
        assert [c.source for c in ipynb.cells] == [c.source for c in py.cells], f"{nb_path.name} and its .py differ: run `jupytext --sync`"


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_small_scale(nb_path, shared_out, monkeypatch):
    monkeypatch.setenv("SDPO_NOTEBOOK_SCALE", "small")
    monkeypatch.setenv("SDPO_NOTEBOOK_OUT", str(shared_out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(nb_path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(nb_path.parent)}})
    client.km = client.create_kernel_manager()
    client.km.kernel_cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]  # this interpreter, not PATH's python
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
