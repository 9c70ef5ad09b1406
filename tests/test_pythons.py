"""Other Pythons: a notebook (run by nbclient) calls functions and runs cells on every other installed
Python of the supported range; functions travel as source, arguments and results as plain pickles."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import nbformat
import pytest
from nbclient import NotebookClient

import fal_magic
from fal_magic.envs.interpreters import SUPPORTED, find_python
from fal_magic.errors import FalMagicError

HOST = f"{sys.version_info[0]}.{sys.version_info[1]}"
OTHERS = [v for v in SUPPORTED if v != HOST]

CELLS = [
    """\
    %load_ext fal_magic
    import json
    import fal_magic
    from fal_magic import isolated

    SETTINGS = {"scale": 3, "name": "probe"}

    def helper(x):
        return x * SETTINGS["scale"]
    """,
    """\
    @isolated(python_version=PYVER, requirements=["numpy"], keep_alive=60)
    def where(n, *, offset=1):
        import sys
        return tuple(sys.version_info[:2]), helper(n) + offset, json.dumps(SETTINGS)

    print("function:", where(2))
    """,
    """\
    %%isolated --python VERSION --requirements numpy --keep-alive 60
    import sys
    print("cell on", tuple(sys.version_info[:2]))
    """,
    """\
    import numpy as np

    @isolated(python_version=PYVER, requirements=["numpy"], keep_alive=60)
    def double(a):
        return a * 2

    out = double(np.arange(6.0).reshape(2, 3))
    print("array:", type(out).__name__, out.dtype, out.shape, out.tolist())
    """,
    """\
    @isolated(keep_alive=60)  # on the notebook's own Python
    def host_version():
        import sys
        return tuple(sys.version_info[:2])

    @isolated(python_version=PYVER, keep_alive=60)
    def asks_back():
        import sys
        return tuple(sys.version_info[:2]), host_version()

    print("nested:", asks_back())
    """,
    """\
    @isolated(python_version=PYVER, keep_alive=60)
    def adder(k):
        def add(x):
            return helper(x) + k
        return add

    @isolated(python_version=PYVER, keep_alive=60)
    def scaler(k):
        return lambda x: x * k

    print("closure:", adder(1)(4))
    try:
        scaler(2)
    except fal_magic.SerializationError as exc:
        print("lambda:", exc)
    """,
    """\
    class Point:
        pass

    try:
        where(Point())
    except fal_magic.SerializationError as exc:
        print("refused:", exc)
    fal_magic.shutdown()
    """,
]


@pytest.fixture(scope="module", params=OTHERS)
def notebook(request, tmp_path_factory) -> tuple[str, list[str]]:
    """The notebook run on the host's Python against ``version``: what each cell printed."""
    version = request.param
    try:
        find_python(f"cpython-{version}")
    except FalMagicError:
        pytest.skip(f"Python {version} is not installed here")
    cells = [nbformat.v4.new_code_cell(textwrap.dedent(c).replace("PYVER", repr(version)).replace("VERSION", version))
             for c in CELLS]
    nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                        "display_name": "Python 3"}})
    folder = tmp_path_factory.mktemp(f"python-{version}")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    printed = ["".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout") for cell in nb.cells]
    return version, printed


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


def test_a_notebook_function_with_a_helper_a_module_and_a_dict_global_runs_on_another_python(notebook):
    version, printed = notebook
    assert printed[1] == f"function: ({_version(version)}, 7, '{{\"scale\": 3, \"name\": \"probe\"}}')\n"


def test_an_isolated_cell_runs_on_the_python_it_names(notebook):
    version, printed = notebook
    assert printed[2] == f"cell on {_version(version)}\n"


def test_a_numpy_array_goes_and_comes_back_whole(notebook):
    _, printed = notebook
    assert printed[3] == "array: ndarray float64 (2, 3) [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]]\n"


def test_an_isolated_function_called_from_another_python_runs_on_its_own(notebook):
    version, printed = notebook
    assert printed[4] == f"nested: ({_version(version)}, {_version(HOST)})\n"


def test_an_object_of_a_class_defined_in_the_notebook_is_refused_by_name(notebook):
    _, printed = notebook
    assert printed[6].startswith("refused: argument 'n' of where(), of type __main__.Point: an object of class "
                                 "Point, which is defined in the notebook, cannot travel to another Python")


def test_a_function_returned_from_another_python_works_here_and_a_lambda_is_refused_by_name(notebook):
    """Its bytecode is of the other Python: a closure comes back as its source (with its closure and
    the globals it uses), a lambda, which has none of its own, as a SerializationError saying why."""
    version, printed = notebook
    closure, refused = printed[5].splitlines()
    assert closure == "closure: 13"  # helper(4) == 12, + 1
    assert refused.startswith(f"lambda: the result, of type function, cannot cross to the caller's Python from "
                              f"Python {version}: a lambda (scaler.<locals>.<lambda>) has no source")


def test_a_python_that_is_not_there_or_not_supported_is_a_clear_error():
    with pytest.raises(FalMagicError, match=r"python_version '3\.9' is not supported: kernels run on Python 3\.10"):
        fal_magic.isolated(python_version="3.9")
    with pytest.raises(FalMagicError, match="must look like '3.12'"):
        fal_magic.isolated(python_version="twelve")
    with pytest.raises(FalMagicError, match="kind='conda' is not supported.*python_version="):
        fal_magic.isolated("conda")


def test_a_python_that_is_not_installed_is_named_with_those_that_are():
    missing = "3.13" if HOST != "3.13" else "3.12"
    env = {**os.environ, "PATH": "/usr/bin:/bin", "PYENV_ROOT": "/nonexistent", "UV_PYTHON_INSTALL_DIR": "/nonexistent"}
    done = subprocess.run([sys.executable, "-c", f"from fal_magic.envs.interpreters import find_python; "
                                                 f"find_python('cpython-{missing}')"],
                          capture_output=True, text=True, env=env)
    assert done.returncode != 0
    assert f"no Python {missing} found on this machine" in done.stderr and f"Pythons found: {HOST}" in done.stderr
