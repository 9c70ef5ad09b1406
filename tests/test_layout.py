"""The house rules, checked on the source: what runs inside kernels imports nothing of the host, and
the host's layers import one way (SPEC's ground floor: errors, then config; envs knows no kernels
and no IPython)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: What every kernel has besides the standard library: ipykernel and what it brings (zmq, IPython).
KERNEL_PROVIDES = {"cloudpickle", "zmq", "ipykernel", "ipykernel_launcher", "IPython"}


def imports(path: Path) -> set[str]:
    """The modules a file imports, and ``module.name`` for each name it takes from one; relative
    ones with their leading dots."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):  # the module, and each name taken from it
            module = "." * node.level + (node.module or "")
            found.add(module)
            found |= {f"{module}.{alias.name}" if node.module else module + alias.name for alias in node.names}
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_the_kernel_side_imports_only_the_standard_library_cloudpickle_and_what_kernels_have():
    for path in modules("fal_magic_inside"):
        for name in imports(path):
            top = name.split(".")[0]
            allowed = name.startswith(".") or top == "fal_magic_inside" or top in sys.stdlib_module_names \
                or top in KERNEL_PROVIDES
            assert allowed, f"{path.relative_to(ROOT)} imports {name}"


def _host_imports(path: Path) -> set[str]:
    """The fal_magic modules a host module imports, as dotted names under fal_magic."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for name in imports(path):
        if name.startswith("."):
            level = len(name) - len(name.lstrip("."))
            base = package.split(".")[:len(package.split(".")) - level + 1]
            name = ".".join([*base, name.lstrip(".")]).rstrip(".")
        if name.split(".")[0] in ("fal_magic", "IPython", "ipywidgets", "jupyter_client"):
            out.add(name)
    return out


def test_the_host_layers_import_one_way():
    for path in modules("fal_magic"):
        rel = path.relative_to(ROOT).as_posix()
        found = _host_imports(path)
        if rel == "fal_magic/errors.py":
            assert not {n for n in found if n.startswith("fal_magic")}, (rel, found)
        if rel == "fal_magic/config.py":
            own = {n for n in found if n.startswith("fal_magic")}
            assert all(n.startswith(("fal_magic.errors", "fal_magic.masking", "fal_magic.platforms")) for n in own), \
                (rel, own)
        if rel in ("fal_magic/masking.py", "fal_magic/platforms.py"):  # the ground floor, beside errors
            assert all(n.startswith("fal_magic.errors") for n in found if n.startswith("fal_magic")), (rel, found)
        if rel.startswith("fal_magic/envs/"):
            layers = ("fal_magic.kernel", "fal_magic.outputs", "fal_magic.magics", "fal_magic.widget",
                      "fal_magic.progress", "IPython", "jupyter_client")
            assert not {n for n in found if n.startswith(layers)}, (rel, found)
        if rel == "fal_magic/envs/indexes.py":  # spec uses indexes, never the other way round
            assert "fal_magic.envs.spec" not in found, (rel, found)
        if rel == "fal_magic/progress.py":  # what it uses of outputs is public there
            assert not any(n.rsplit(".", 1)[-1].startswith("_") for n in found), (rel, found)


def _design_tree() -> set[str]:
    """The modules the design page's tree names, as paths (``fal_magic/envs/spec.py``)."""
    text = (ROOT / "docs" / "design.md").read_text()
    block = text.split("```\n", 2)[1]
    named, folders = set(), []  # folders: (indent, name) of the enclosing directories
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        entry = line.strip().split("  ")[0]
        if not entry or not entry.endswith(("/", ".py", ",")) and ".py" not in entry:
            continue
        folders = [(i, f) for i, f in folders if i < indent]
        if entry.endswith("/"):
            folders.append((indent, entry))
            continue
        for name in entry.split(","):
            named.add("".join(f for _, f in folders) + name.strip())
    return named


def test_every_module_has_a_line_on_the_design_page():
    named = _design_tree()
    missing = [path.relative_to(ROOT).as_posix() for package in ("fal_magic", "fal_magic_inside")
               for path in modules(package) if path.relative_to(ROOT).as_posix() not in named]
    assert not missing, f"modules the design page does not name: {missing}"


def test_the_benchmarks_and_the_testbed_import_nothing_of_the_tests_and_one_way():
    """A harness both use belongs to neither: benchmarks and the test bed never import the tests,
    the test bed never imports the benchmarks, and the benchmarks import one another one way."""
    for package in ("benchmarks", "testbed"):
        for path in modules(package):
            found = imports(path)
            assert not [n for n in found if n.split(".")[0] == "tests"], (path, found)
            if package == "testbed":
                assert not [n for n in found if n.split(".")[0] == "benchmarks"], (path, found)
    assert not [n for n in imports(ROOT / "benchmarks" / "cluster.py") if n.startswith("benchmarks.run")]
