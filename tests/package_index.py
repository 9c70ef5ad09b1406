"""A package index on 127.0.0.1 for the tests: tiny pure-Python wheels of a name the public index does
not have, published version by version, behind a password (or none)."""
from __future__ import annotations

import base64
import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "falmagic-private-probe"  # a name the public index does not have
MODULE = "falmagic_private_probe"
USER, PASSWORD = "alice", "s3cret-pw-1234"


def build_wheel(folder: Path, version: str, package: str = PACKAGE) -> Path:
    """A minimal pure-Python wheel of ``package`` whose module says which version it is."""
    module = package.replace("-", "_")
    dist = f"{module}-{version}"
    wheel = folder / f"{dist}-py3-none-any.whl"
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in {**files, f"{dist}.dist-info/RECORD": record}.items():
            z.writestr(name, text)
    return wheel


class PrivateIndex:
    """A PEP 503 index of one package that answers only with the right password (``password=True``),
    and counts what it served. ``start()`` it, ``stop()`` it."""

    def __init__(self, root: Path, package: str = PACKAGE, password: bool = True) -> None:
        self.root = root
        self.package = package
        self.password = password
        self.served: list[str] = []
        (root / "files").mkdir(parents=True, exist_ok=True)
        (root / "simple" / package).mkdir(parents=True, exist_ok=True)
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        index = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):  # noqa: N802 - the stdlib's name
                if password and self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="private"')
                    self.end_headers()
                    return
                index.served.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        auth = f"{USER}:{PASSWORD}@" if self.password else ""
        return f"http://{auth}127.0.0.1:{self.server.server_address[1]}/simple/"

    def publish(self, version: str) -> None:
        """Put a version of the package on the index (the newest is what an install takes)."""
        build_wheel(self.root / "files", version, self.package)
        links = "".join(f'<a href="../../files/{w.name}">{w.name}</a>\n'
                        for w in sorted((self.root / "files").glob("*.whl")))
        (self.root / "simple" / self.package / "index.html").write_text(f"<html><body>{links}</body></html>")

    def start(self) -> PrivateIndex:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(root: Path, versions: tuple[str, ...], package: str = PACKAGE,
          password: bool = True) -> Iterator[PrivateIndex]:
    """For a fixture: an index of ``package`` with ``versions`` published, running until the fixture ends."""
    index = PrivateIndex(root, package, password)
    for version in versions:
        index.publish(version)
    yield index.start()
    index.stop()
