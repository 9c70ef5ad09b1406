"""Every notebook in notebooks/ runs top to bottom in a real kernel (nbclient), with the outputs a user sees."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str, allow_errors: bool = False) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=allow_errors,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def outputs(cell, name: str = "stdout") -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == name)


def test_every_notebook_is_covered():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(COVERED)


def test_quickstart():
    nb = execute("quickstart.ipynb")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "cold call: 2" in outputs(code[1]) and "warm call: 2" in outputs(code[1])
    assert "cold call: 1,000,000" in outputs(code[2]) and "warm call: 1,000,000,000" in outputs(code[2])
    assert "running in pid" in outputs(code[2])  # the function's print reached the cell
    html = code[3].outputs[0]["data"]["text/html"]
    assert "humanize==4.16.0" in html and "idle" in html


def test_cell_magic_notebook():
    nb = execute("cell_magic.ipynb", allow_errors=True)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "1,000,000" in outputs(code[1]) and "a    b" in outputs(code[1])
    assert "summary in the notebook: [14, 15, 92, 65]" in outputs(code[4])
    plot_cell = code[5]
    kinds = [set(o.get("data", {})) for o in plot_cell.outputs]
    assert any("text/html" in k for k in kinds), plot_cell.outputs
    assert any("image/png" in k for k in kinds), plot_cell.outputs
    assert outputs(code[6]) == "done\n"  # clear_output in the kernel cleared 'working...' here
    error_cell = code[7]
    [err] = [o for o in error_cell.outputs if o.output_type == "error"]
    assert err.ename == "RemoteError"
    assert any("bad input 42" in line for line in err.traceback)


def test_run_all_stops_at_the_failing_cell():
    with pytest.raises(CellExecutionError, match="bad input 42"):
        execute("cell_magic.ipynb")


def test_fal_serverless_examples():
    nb = execute("fal_serverless_examples.ipynb")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert outputs(code[1]) == "hello world\n"
    assert outputs(code[2]).startswith("joke: ")
    assert outputs(code[3]) == "model loaded once: True 4\n"
    assert outputs(code[4]) == "virtualenv kind\n"


COVERED = ["quickstart.ipynb", "cell_magic.ipynb", "fal_serverless_examples.ipynb"]
