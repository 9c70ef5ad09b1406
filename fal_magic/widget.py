"""The kernel list: ``fal_magic.kernels()``, a view of ``KernelPool.snapshot()`` and nothing else.

In a notebook it is a live ipywidgets table (with an HTML table as the fallback for frontends
without widgets); in a terminal it prints as plain text.
"""
from __future__ import annotations

import html
import os
import threading
import urllib.parse
import time
import weakref
from typing import Any, Iterator

from .kernel import KernelInfo, KernelPool, get_pool

COLUMNS = ("key", "requirements", "pid", "state", "calls", "last used", "culled in", "memory")
_WIDTHS = ("90px", "190px", "150px", "70px", "50px", "80px", "80px", "80px")


def _memory(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _culled_in(info: KernelInfo) -> str:
    left = info.seconds_left
    if left is None:
        return "never while busy" if info.state == "busy" else "-"
    return f"{left:.1f}s"


def _row(info: KernelInfo, now: float) -> tuple[str, ...]:
    reqs = ", ".join(info.requirements) or "-"
    if info.machine_type:  # a server with host groups enforces it; this machine cannot
        reqs += f" [{info.machine_type}]" if info.host is not None else f" [{info.machine_type}, not enforced]"
    pid = str(info.pid or "-")
    if info.host is not None:
        server = urllib.parse.urlsplit(info.host).netloc
        pid += f" on {info.node} via {server}" if info.node else f" on {server}"
    state = info.state
    if info.holder is not None and info.holder != os.getpid():  # (the user's pool: another process's call)
        state += f" (process {info.holder})"
    return (info.key[:8], reqs, pid, state, str(info.calls),
            f"{max(0.0, now - info.last_used):.0f}s ago", _culled_in(info), _memory(info.rss_bytes))


def _in_kernel() -> bool:
    """True inside a Jupyter kernel, where widgets can render."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class KernelList:
    """The live kernels of this process, as records; renders as a table wherever it is shown."""

    def __init__(self, pool: KernelPool | None = None) -> None:
        self.pool = pool or get_pool()

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

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle = {"text/plain": self.text(), "text/html": self._repr_html_()}
        if _in_kernel():
            try:
                view = KernelTable(self.pool)
            except ImportError:  # no ipywidgets: the HTML table is shown
                return bundle
            bundle.update({k: v for k, v in view.widget._repr_mimebundle_().items() if k != "text/plain"})
        return bundle


class KernelTable:
    """The live widget: one row per kernel, a countdown that ticks, a shut-down button per kernel.

    A background thread refreshes it every ``interval`` seconds until the widget is closed, and only
    sends what changed: nothing at all while there are no kernels, and after ``quiet_after`` seconds
    without a new kernel, call or state it slows to every ``quiet_interval`` seconds.
    """

    #: Seconds without a change of kernels, calls or states after which the table ticks slower.
    quiet_after = 60.0
    quiet_interval = 5.0

    def __init__(self, pool: KernelPool, interval: float = 1.0) -> None:
        import ipywidgets as w

        self._w = w
        self.pool = pool
        self.interval = interval
        self._rows: dict[str, tuple[Any, list[Any]]] = {}
        self._signature: tuple[tuple[str, str, int], ...] = ()
        self._changed_at = time.monotonic()
        header = w.HBox([self._cell(f"<b>{c}</b>", i) for i, c in enumerate(COLUMNS)] + [self._cell("", 8)])
        self.empty = w.HTML("<em>no warm kernels</em>")
        self.rows_box = w.VBox([])
        self.all_button = w.Button(description="shut down all", button_style="danger",
                                   layout=w.Layout(width="130px"))
        self.all_button.on_click(self._shut_down_all)
        title = w.HTML("<b>fal_magic warm kernels</b> <small>(live)</small>")
        self.widget = w.VBox([title, header, self.rows_box, self.empty, self.all_button])
        self.widget.add_class("fal-magic-kernels")
        self.refresh()
        ref = weakref.ref(self)
        threading.Thread(target=KernelTable._tick, args=(ref, interval), daemon=True,
                         name="fal_magic-kernel-table").start()

    def _shut_down_all(self, _: Any) -> None:
        self.pool.shutdown()
        self.refresh()

    def _cell(self, text: str, column: int) -> Any:
        width = _WIDTHS[column] if column < len(_WIDTHS) else "110px"
        return self._w.HTML(text, layout=self._w.Layout(width=width))

    def refresh(self) -> None:
        """Bring the rows in line with the pool's snapshot."""
        now = time.time()
        records = {r.kernel_id: r for r in self.pool.snapshot()}
        signature = tuple((kid, r.state, r.calls) for kid, r in records.items())
        if signature != self._signature:
            self._signature, self._changed_at = signature, time.monotonic()
        for kid in [k for k in self._rows if k not in records]:
            row, _ = self._rows.pop(kid)
            row.close()
        for kid, info in records.items():
            values = _row(info, now)
            if kid not in self._rows:
                cells = [self._cell(html.escape(v), i) for i, v in enumerate(values)]
                button = self._w.Button(description="shut down", layout=self._w.Layout(width="100px"))
                button.on_click(lambda _, kid=kid: self.pool.shutdown(kernel_ids=[kid]))
                row = self._w.HBox(cells + [button])
                row.add_class("fal-magic-row")
                self._rows[kid] = (row, cells)
            for cell, value in zip(self._rows[kid][1], values):
                escaped = html.escape(value)
                if cell.value != escaped:
                    cell.value = escaped
        children = tuple(row for row, _ in self._rows.values())
        if self.rows_box.children != children:
            self.rows_box.children = children
        self.empty.layout.display = "none" if self._rows else ""
        self.all_button.disabled = not self._rows  # nothing to shut down
        self.all_button.button_style = "danger" if self._rows else ""

    def next_interval(self) -> float:
        """Seconds until the next refresh: slower once nothing but the countdowns has changed for a while."""
        quiet = time.monotonic() - self._changed_at > self.quiet_after
        return max(self.interval, self.quiet_interval) if quiet else self.interval

    @staticmethod
    def _tick(ref: "weakref.ref[KernelTable]", interval: float) -> None:
        while True:
            time.sleep(interval)
            table = ref()
            if table is None or table.widget.comm is None:  # closed or collected: stop
                return
            try:
                table.refresh()
            except Exception:
                return
            interval = table.next_interval()
            del table


def kernels() -> KernelList:
    """The warm kernels of this process: iterable records, shown as a (live, in a notebook) table."""
    return KernelList()
