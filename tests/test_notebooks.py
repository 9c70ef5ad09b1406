"""Every notebook in notebooks/ runs top to bottom in a real kernel (nbclient), with the outputs a user sees."""
from __future__ import annotations

import re
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
    [result] = code[7].outputs  # the last expression is the cell's own result, with its Out[n] prompt
    assert result.output_type == "execute_result" and result.execution_count == code[7].execution_count
    assert result.data["text/plain"] == "{'count': 4, 'total': 186}"
    error_cell = code[8]
    [err] = [o for o in error_cell.outputs if o.output_type == "error"]
    assert (err.ename, err.evalue) == ("ValueError", "bad input 42")  # as a local cell's error reads
    text = _plain(err.traceback)
    assert "ValueError: bad input 42" in text and "RemoteError" not in text  # the user's type, not ours
    assert f"Cell In[{error_cell.execution_count}], line 3" in text  # named after the calling cell


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


def _plain(lines) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(lines))


def test_a_remote_exception_reads_like_a_local_one():
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell(source) for source in (
        "from fal_magic import isolated\n\ndef lookup(table, key):\n    return table[key]",
        "@isolated(keep_alive=30)\ndef load(key):\n    try:\n        lookup({}, key)\n    except KeyError as exc:\n"
        "        raise ValueError(f'no setting {key}') from exc\n\nload('depth')",
    )]
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True).execute()
    helper, caller = nb.cells
    [err] = [o for o in caller.outputs if o.output_type == "error"]
    text = _plain(err.traceback)
    assert err.ename == "ValueError"
    assert f"Cell In[{helper.execution_count}], line 4, in lookup" in text  # defined in another cell
    assert f"Cell In[{caller.execution_count}], line 6, in load" in text
    assert "return table[key]" in text and "The above exception was the direct cause" in text
    assert text.count("ValueError: no setting depth") == 1 and text.count("KeyError: 'depth'") == 1
    assert "fal_magic/" not in text and "traceback in the isolated kernel" not in text
    assert "<dynamic-code>" not in text and "ipykernel_" not in text


COVERED = ["quickstart.ipynb", "cell_magic.ipynb", "fal_serverless_examples.ipynb"]


def test_progress_is_one_status_line_updated_in_place_never_stderr(tmp_path, remote):
    from .conftest import TOKEN

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell(source) for source in (
        "import os\nos.environ['FAL_MAGIC_HOME'] = " + repr(str(tmp_path / "home")) + "\n"
        "from fal_magic import isolated\n\n"
        "@isolated(keep_alive=60, requirements=['text-unidecode==1.3'])\n"
        "def f():\n    return 1\n\nf()",  # builds an environment and starts a kernel
        "f()",  # warm: nothing to show
        "%load_ext fal_magic",
        "%%isolated --requirements text-unidecode==1.3\n6 * 7",  # a kernel of the built environment
        "%%isolated --requirements tabulate==99.0\n1",  # a build that fails
        f"import fal_magic\nfal_magic.configure(token={TOKEN!r})",
        f"%%isolated --host {remote}\n6 * 7",  # a kernel on a server
    )]
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True).execute()
    build, warm, _, cell, failed, _, far = nb.cells
    for each in nb.cells:  # a status line shown stays in the saved notebook: never as a blank output
        assert all(o.data.get("text/plain") for o in each.outputs if o.output_type == "display_data"), each.outputs
    assert [o.data["text/plain"] for o in far.outputs if o.output_type == "execute_result"] == ["42"]
    assert not [o for o in build.outputs if o.output_type == "stream" and o.name == "stderr"], build.outputs
    displays = [o for o in build.outputs if o.output_type == "display_data"]
    assert len(displays) == 1, build.outputs  # one line, updated in place, not one output per step
    summary = displays[0].data["text/plain"]
    assert summary.startswith("fal_magic · text-unidecode==1.3 · environment ") and " · kernel " in summary
    assert [o.output_type for o in warm.outputs] == ["execute_result"]
    assert [o.data["text/plain"] for o in cell.outputs if o.output_type == "execute_result"] == ["42"]
    assert not [o for o in cell.outputs if o.output_type == "stream"]
    [error] = [o for o in failed.outputs if o.output_type == "error"]
    text = "\n".join(error.traceback)
    assert error.ename == "EnvironmentBuildError" and "tabulate==99.0" in error.traceback[0]
    assert "fal_magic/" not in text and "site-packages" not in text  # a message, not fal_magic's frames
    assert len(error.traceback) <= 12, text
    assert not [o for o in failed.outputs if o.output_type == "stream" and o.name == "stderr"]
