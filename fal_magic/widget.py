"""The kernel list: ``fal_magic.kernels()``, a view of the pool's snapshot.

In a notebook it renders as a table (HTML); in a terminal it prints as plain text. It reads only
``KernelPool.snapshot()``.
"""
from __future__ import annotations

import html
import time
from typing import Any, Iterator

from .kernel import KernelInfo, get_pool

COLUMNS = ("key", "requirements", "pid", "state", "calls", "last used", "culled in")


def _row(info: KernelInfo, now: float) -> tuple[str, ...]:
    left = info.seconds_left
    return (
        info.key[:8],
        ", ".join(info.requirements) or "-",
        str(info.pid or "-"),
        info.state,
        str(info.calls),
        f"{now - info.last_used:.0f}s ago",
        "-" if left is None else f"{left:.1f}s",
    )


class KernelList:
    """The live kernels of this process, as records; renders as a table wherever it is shown."""

    def __init__(self) -> None:
        self.pool = get_pool()

    def records(self) -> list[KernelInfo]:
        return self.pool.snapshot()

    def __iter__(self) -> Iterator[KernelInfo]:
        return iter(self.records())

    def __len__(self) -> int:
        return len(self.records())

    def text(self) -> str:
        """A plain-text table of the kernels."""
        now = time.time()
        rows = [COLUMNS] + [_row(r, now) for r in self.records()]
        if len(rows) == 1:
            return "no warm kernels"
        widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)

    def __repr__(self) -> str:
        return self.text()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.text())

    def _repr_html_(self) -> str:
        now = time.time()
        records = self.records()
        if not records:
            return "<p><em>no warm kernels</em></p>"
        head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _row(r, now)) + "</tr>"
                       for r in records)
        return f"<table class='fal-magic-kernels'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def kernels() -> KernelList:
    """The warm kernels of this process: iterable records, shown as a table."""
    return KernelList()
