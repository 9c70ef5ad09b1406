"""The kernel list: the snapshot API, the text table, and the live widget in a real browser."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from fal_magic import isolated, kernels
from fal_magic.kernel import get_pool

from .conftest import pid_alive, wait_until

CHROMIUM = "/usr/bin/chromium"


@isolated(keep_alive=30, requirements=["humanize==4.16.0"], machine_type="GPU-H100")
def pid():
    import os

    return os.getpid()


def test_snapshot_follows_start_busy_cull_and_shutdown():
    assert list(kernels()) == [] and kernels().text() == "no warm kernels"

    @isolated(keep_alive=1)
    def slow_pid():
        import os
        import time

        time.sleep(1.5)
        return os.getpid()

    fut = slow_pid.submit()
    assert wait_until(lambda: [r.state for r in kernels()] == ["busy"], timeout=120)
    [busy] = kernels()
    assert busy.seconds_left is None  # never culled while busy
    kernel_pid = fut.result(timeout=60)
    [idle] = kernels()
    assert idle.state == "idle" and idle.pid == kernel_pid and idle.calls == 1
    assert idle.rss_bytes and idle.rss_bytes > 10 * 2**20
    assert wait_until(lambda: len(kernels()) == 0, timeout=10)  # culled

    other = pid()
    [info] = kernels()
    assert info.machine_type == "GPU-H100"
    get_pool().shutdown(kernel_ids=[info.kernel_id])
    assert len(kernels()) == 0 and not pid_alive(other)


def test_text_and_html_tables_list_the_kernels():
    kernel_pid = pid()
    text = kernels().text()
    header, row = text.splitlines()
    for column in ("key", "requirements", "pid", "state", "calls", "last used", "culled in", "memory"):
        assert column in header
    assert str(kernel_pid) in row and "humanize==4.16.0" in row and "idle" in row and "MiB" in row
    assert "GPU-H100, not enforced" in row
    html = kernels()._repr_html_()
    assert f"<td>{kernel_pid}</td>" in html and "<th>culled in</th>" in html


def test_the_live_table_sends_only_changes_and_shut_down_all_needs_kernels():
    from fal_magic.widget import KernelTable

    table = KernelTable(get_pool(), interval=3600)  # no ticks during the test: refreshed by hand
    try:
        assert table.all_button.disabled and table.next_interval() == 3600
        kernel_pid = pid()
        table.refresh()
        assert not table.all_button.disabled and table.all_button.button_style == "danger"
        [(row, cells)] = table._rows.values()
        sent = []
        for cell in cells:
            cell.observe(lambda change: sent.append(change["name"]), names="value")
        table.refresh()
        table.refresh()
        assert len(sent) <= 2  # at most the countdown and "last used" move, not the whole row
        table.interval, table.quiet_after = 1.0, 0.0
        assert table.next_interval() == table.quiet_interval  # nothing but countdowns changed: slower
        table._shut_down_all(None)
        assert table.all_button.disabled and not table._rows and not pid_alive(kernel_pid)
    finally:
        table.widget.close()


# -- the real browser ------------------------------------------------------------------------------

NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source":
            "from fal_magic import isolated\n\n@isolated(keep_alive=300)\ndef pid():\n    import os\n"
            "    return os.getpid()\n\n@isolated(keep_alive=120, requirements=['humanize==4.16.0'])\n"
            "def nice(n):\n    import humanize\n    return humanize.intcomma(n)\n\n"
            "print('kernel-pid', pid(), nice(10**6))"},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source":
            "%load_ext fal_magic\n%isolated_kernels"},
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 with a token, serving a notebook; stopped with its kernels."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":  # on CI the browser test must run: a skip would pass silently
            pytest.fail(f"{CHROMIUM} is missing on CI: .ci/run could not install it")
        pytest.skip(f"!!! BROWSER TEST SKIPPED: {CHROMIUM} is missing !!!")
    root = tmp_path / "lab"
    root.mkdir()
    (root / "widget.ipynb").write_text(json.dumps(NOTEBOOK))
    port, token = _free_port(), "fal-magic-test-token"
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--ServerApp.port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--ServerApp.port_retries=0", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"]  # no tabs restored from another test
        + (["--allow-root"] if os.geteuid() == 0 else []),
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
        env=dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime")))
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            return True
        except OSError:
            return False

    try:
        assert wait_until(lambda: up() or proc.poll() is not None, timeout=60, interval=0.3) and up(), (
            (tmp_path / "lab.log").read_text())
        yield url, token
    finally:
        proc.terminate()  # the server shuts its kernels down, whose exit stops their isolated kernels
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def _notebook_page(lab, name: str, width: int, height: int):
    """A page of Debian's Chromium showing notebook ``name`` of the ``lab`` server, its kernel idle."""
    from playwright.sync_api import sync_playwright

    url, token = lab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(f"{url}/lab/tree/{name}?token={token}")
            page.wait_for_selector("text=Python 3 (ipykernel) | Idle", timeout=90_000)
            yield page
        finally:
            browser.close()


def test_widget_in_jupyterlab(lab, tmp_path, fal_home):
    started = time.monotonic()
    with _notebook_page(lab, "widget.ipynb", width=1400, height=900) as page:
        page.locator(".jp-Notebook .jp-Cell").first.click()
        page.keyboard.press("Shift+Enter")
        page.keyboard.press("Shift+Enter")

        out = page.locator(".jp-OutputArea-output", has_text="kernel-pid")
        out.wait_for(timeout=180_000)
        kernel_pid = int(re.search(r"kernel-pid (\d+)", out.inner_text()).group(1))
        assert pid_alive(kernel_pid)

        row = page.locator(".jp-OutputArea-output .fal-magic-kernels .fal-magic-row", has_text=str(kernel_pid))
        row.wait_for(timeout=60_000)
        cells = row.locator(".widget-html")
        assert "idle" in cells.nth(3).inner_text()
        first = cells.nth(6).inner_text()
        page.wait_for_timeout(2500)
        second = cells.nth(6).inner_text()
        assert first != second, "the countdown did not tick"
        assert float(second.rstrip("s")) < float(first.rstrip("s"))

        shot = tmp_path / "kernels-widget.png"
        page.locator(".jp-OutputArea-output .fal-magic-kernels").screenshot(path=str(shot))
        assert shot.stat().st_size > 1000
        target = os.environ.get("FAL_MAGIC_SCREENSHOT")
        if target:
            shutil.copy(shot, target)

        row.locator("button", has_text="shut down").click()
        row.wait_for(state="detached", timeout=30_000)
        assert wait_until(lambda: not pid_alive(kernel_pid), timeout=10)
        table = page.locator(".jp-OutputArea-output .fal-magic-kernels")
        assert table.locator(".fal-magic-row").count() == 1  # the other kernel is still listed
        table.locator("button", has_text="shut down all").click()
        table.locator(".fal-magic-row").first.wait_for(state="detached", timeout=30_000)
        page.get_by_text("no warm kernels").wait_for(timeout=10_000)
    print(f"browser test took {time.monotonic() - started:.1f}s")


def _code_cell(source: str) -> dict:
    return {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": source}


def test_progress_results_and_errors_read_well_in_jupyterlab(lab, tmp_path):
    """A build's status line, an isolated cell's Out[n], a failed build and a remote error, as a
    person sees them in JupyterLab (screenshots for the README with FAL_MAGIC_SCREENSHOT_DIR)."""
    home = tmp_path / "fresh_home"  # a cache of its own: the first cell builds its environment
    notebook = {**NOTEBOOK, "cells": [
        _code_cell(f"import os\nos.environ['FAL_MAGIC_HOME'] = {str(home)!r}\n%load_ext fal_magic"),
        _code_cell("%%isolated --requirements text-unidecode==1.3\nfrom text_unidecode import unidecode\n"
                   "unidecode('Ærøskøbing')"),
        _code_cell("%%isolated --requirements tabulate==99.0\nimport tabulate"),
        _code_cell("from fal_magic import isolated\n\n@isolated\ndef check(x):\n    if x > 10:\n"
                   "        raise ValueError(f'too big: {x}')\n    return x\n\ncheck(42)"),
        _code_cell("@isolated(keep_alive=30)\ndef talk():\n    import time\n    time.sleep(2)\n"
                   "    print('said in the background', flush=True)\n    return 7\n\nfuture = talk.submit()"),
        _code_cell("print('the next cell got', future.result())"),
    ]}
    (tmp_path / "lab" / "presentation.ipynb").write_text(json.dumps(notebook))  # the lab fixture's root
    shots = os.environ.get("FAL_MAGIC_SCREENSHOT_DIR") or str(tmp_path)
    with _notebook_page(lab, "presentation.ipynb", width=1100, height=1000) as page:
        cells = page.locator(".jp-NotebookPanel:visible .jp-CodeCell")
        cells.nth(0).click()
        page.keyboard.press("Shift+Enter")  # the setup cell
        page.keyboard.press("Shift+Enter")  # the build
        status = cells.nth(1).locator(".jp-OutputArea-output", has_text="fal_magic · text-unidecode==1.3")
        status.wait_for(timeout=120_000)
        result = cells.nth(1).locator(".jp-OutputArea-output", has_text="Aeroskobing")
        result.wait_for(timeout=120_000)
        prompt = cells.nth(1).locator(".jp-OutputArea-child", has_text="Aeroskobing").locator(".jp-OutputPrompt")
        assert re.fullmatch(r"\[\d+\]:", prompt.inner_text().strip())  # the cell's result, with its prompt
        assert "environment" in status.inner_text()  # collapsed to the summary
        assert cells.nth(1).locator("[data-mime-type='application/vnd.jupyter.stderr']").count() == 0
        page.keyboard.press("Shift+Enter")  # the failed build
        failed = cells.nth(2).locator("[data-mime-type='application/vnd.jupyter.stderr']",
                                      has_text="EnvironmentBuildError")
        failed.wait_for(timeout=120_000)
        text = failed.inner_text()
        assert "tabulate==99.0" in text and "fal_magic/" not in text and len(text.splitlines()) <= 12
        page.keyboard.press("Shift+Enter")  # the remote error
        error = cells.nth(3).locator("[data-mime-type='application/vnd.jupyter.stderr']", has_text="too big: 42")
        error.wait_for(timeout=120_000)
        shown = error.inner_text()
        assert "Cell In[4], line 6, in check" in shown and "fal_magic/" not in shown  # the user's frames only
        assert shown.count("ValueError: too big: 42") == 1
        news = page.get_by_role("button", name="No", exact=True)  # JupyterLab's news question, if asked
        if news.count():
            news.first.click()
        page.locator(".jp-NotebookPanel:visible .jp-Notebook").screenshot(
            path=os.path.join(shots, "notebook-presentation.png"))
        cells.nth(4).click()  # the focus again (answering the news question took it)
        page.keyboard.press("Shift+Enter")  # a submitted call that prints after its cell has finished
        page.keyboard.press("Shift+Enter")
        cells.nth(5).locator(".jp-OutputArea-output", has_text="the next cell got 7").wait_for(timeout=120_000)
        # the print reaches the cell that started the call, not the one running when it came
        cells.nth(4).locator(".jp-OutputArea-output", has_text="said in the background").wait_for(timeout=30_000)
        assert "said in the background" not in cells.nth(5).locator(".jp-OutputArea").inner_text()


def test_isolated_code_asks_in_the_calling_cell_in_jupyterlab(lab, tmp_path):
    """input() and a password prompt from an isolated function appear as the cell's input boxes (the
    password hidden), and breakpoint() gives a debugger prompt there: a person types, the code goes on."""
    notebook = {**NOTEBOOK, "cells": [
        _code_cell("from fal_magic import isolated\n\n@isolated(keep_alive=60)\ndef sign_up():\n"
                   "    import getpass\n    name = input('your name? ')\n    key = getpass.getpass('API key: ')\n"
                   "    return f'{name} signed up with a key of {len(key)} characters'\n\nsign_up()"),
        _code_cell("@isolated(keep_alive=60)\ndef scale(values):\n    factor = 3\n    breakpoint()\n"
                   "    return [v * factor for v in values]\n\nscale([1, 2])"),
    ]}
    (tmp_path / "lab" / "asking.ipynb").write_text(json.dumps(notebook))
    shots = os.environ.get("FAL_MAGIC_SCREENSHOT_DIR") or str(tmp_path)
    with _notebook_page(lab, "asking.ipynb", width=1100, height=800) as page:
        cells = page.locator(".jp-NotebookPanel:visible .jp-CodeCell")
        cells.nth(0).click()
        page.keyboard.press("Shift+Enter")
        box = cells.nth(0).locator(".jp-Stdin", has_text="your name?").locator("input")
        box.wait_for(timeout=120_000)
        box.fill("Ada")
        box.press("Enter")
        secret = cells.nth(0).locator(".jp-Stdin", has_text="API key:").locator("input")
        secret.wait_for(timeout=60_000)
        assert secret.get_attribute("type") == "password"  # hidden, as getpass() is in a local cell
        secret.fill("sk-12345")
        secret.press("Enter")
        cells.nth(0).locator(".jp-OutputArea-output", has_text="Ada signed up with a key of 8 characters").wait_for(
            timeout=60_000)
        assert "sk-12345" not in cells.nth(0).inner_text()

        cells.nth(1).click()  # (the focus went with the answered input box)
        page.keyboard.press("Shift+Enter")
        prompt = cells.nth(1).locator(".jp-Stdin", has_text="ipdb>").last.locator("input")
        prompt.wait_for(timeout=60_000)
        prompt.fill("p factor, values")
        prompt.press("Enter")
        cells.nth(1).locator(".jp-OutputArea-output", has_text="(3, [1, 2])").wait_for(timeout=60_000)
        assert "----> 5" in cells.nth(1).locator(".jp-OutputArea").inner_text()  # the remote source, as ipdb shows it
        page.locator(".jp-NotebookPanel:visible .jp-Notebook").screenshot(path=os.path.join(shots, "asking.png"))
        prompt = cells.nth(1).locator(".jp-Stdin input").last
        prompt.wait_for(timeout=60_000)
        prompt.fill("c")
        prompt.press("Enter")
        cells.nth(1).locator(".jp-OutputArea-output", has_text="[3, 6]").wait_for(timeout=60_000)


def test_a_widget_from_an_isolated_kernel_is_live_in_jupyterlab(lab, tmp_path):
    """A slider made in an isolated kernel renders in the calling cell; moving it (the keyboard, as a
    person may) runs its callback in the isolated kernel, whose print appears in that cell."""
    notebook = {**NOTEBOOK, "cells": [
        _code_cell("from fal_magic import isolated\n\n@isolated(keep_alive=120, requirements=['ipywidgets'])\n"
                   "def slider():\n    import ipywidgets as widgets\n    from IPython.display import display\n\n"
                   "    s = widgets.IntSlider(value=5, description='threshold')\n"
                   "    s.observe(lambda change: print('threshold is now', change['new']), names='value')\n"
                   "    display(s)\n\nslider()"),
        _code_cell("@isolated(keep_alive=120, requirements=['ipywidgets', 'tqdm'])\ndef count(n):\n"
                   "    import time\n    from tqdm.auto import tqdm\n\n    for _ in tqdm(range(n), desc='rows'):\n"
                   "        time.sleep(0.05)\n    return n\n\ncount(4)"),
    ]}
    (tmp_path / "lab" / "live.ipynb").write_text(json.dumps(notebook))
    shots = os.environ.get("FAL_MAGIC_SCREENSHOT_DIR") or str(tmp_path)
    with _notebook_page(lab, "live.ipynb", width=1000, height=820) as page:
        cell = page.locator(".jp-NotebookPanel:visible .jp-CodeCell").first
        cell.click()
        page.keyboard.press("Shift+Enter")
        handle = cell.locator(".widget-slider .noUi-handle")
        handle.wait_for(timeout=180_000)
        assert cell.locator(".widget-readout").inner_text().strip() == "5"
        handle.focus()
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")
        cell.locator(".jp-OutputArea-output", has_text="threshold is now 7").wait_for(timeout=60_000)
        assert cell.locator(".widget-readout").inner_text().strip() == "7"

        bar = page.locator(".jp-NotebookPanel:visible .jp-CodeCell").nth(1)
        bar.click()
        page.keyboard.press("Shift+Enter")  # tqdm.auto: a widget bar, as in a local cell
        bar.locator(".widget-hprogress").wait_for(timeout=180_000)
        bar.locator(".widget-html", has_text="4/4").wait_for(timeout=60_000)
        assert "TqdmWarning" not in bar.inner_text()
        page.locator(".jp-NotebookPanel:visible .jp-Notebook").screenshot(path=os.path.join(shots, "live-widget.png"))
