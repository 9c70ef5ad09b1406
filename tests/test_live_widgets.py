"""Widgets made in an isolated kernel are live in the calling notebook: through jupyter_client, this
test is a notebook's frontend. It sees the widget's comm_open (with its state) and its view, moves the
slider by sending the update a frontend sends, and sees the callback's print in the cell that made the
widget, the kernel's echo of the new value, and the widget closed when its kernel ends."""
from __future__ import annotations

import time

import pytest


class Frontend:
    """A notebook kernel, and this test as its frontend."""

    def __init__(self) -> None:
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3")
        self.messages: list[dict] = []

    def run(self, code: str, timeout: float = 300) -> str:
        """Run a cell; its msg_id. Every iopub message is kept, whichever cell it belongs to (the
        widget's messages belong to the cell that made it)."""
        msg_id = self.kc.execute(code)
        self.wait_for(lambda m: m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status"
                      and m["content"]["execution_state"] == "idle", timeout=timeout)
        error = [m for m in self.messages if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "error"]
        assert not error, error[0]["content"]
        return msg_id

    def send(self, msg_type: str, content: dict) -> None:
        self.kc.shell_channel.send(self.kc.session.msg(msg_type, content))

    def wait_for(self, predicate, timeout: float = 60.0) -> dict:
        """The first iopub message (seen before or arriving within ``timeout``) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages:
                if predicate(m):
                    return m
            if time.monotonic() > deadline:
                raise AssertionError(f"not seen: {[(m['msg_type'], m['content']) for m in self.messages][-20:]}")
            try:
                self.messages.append(self.kc.get_iopub_msg(timeout=0.5))
            except Exception:
                pass

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture
def frontend():
    f = Frontend()
    yield f
    try:  # (a notebook kernel stuck in a widget's message would not run it: then it is ended all the same)
        f.run("import fal_magic; fal_magic.shutdown()", timeout=60)
    finally:
        f.close()


SLIDER = """
from fal_magic import isolated

@isolated(keep_alive=120, requirements=["ipywidgets"])
def slider():
    import ipywidgets as widgets
    from IPython.display import display

    s = widgets.IntSlider(value=1, description="n")
    s.observe(lambda change: print("moved to", change["new"]), names="value")
    display(s)
    return "shown"

print(slider())
"""


def is_stream(text: str):
    return lambda m: m["msg_type"] == "stream" and text in m["content"]["text"]


def test_a_slider_from_an_isolated_function_is_live_in_the_notebook(frontend):
    cell_id = frontend.run(SLIDER)
    opened = frontend.wait_for(lambda m: m["msg_type"] == "comm_open"
                               and m["content"]["target_name"] == "jupyter.widget"
                               and m["content"]["data"]["state"].get("_model_name") == "IntSliderModel")
    model_id = opened["content"]["comm_id"]
    assert opened["content"]["data"]["state"]["value"] == 1
    view = frontend.wait_for(lambda m: m["msg_type"] == "display_data" and "application/vnd.jupyter.widget-view+json"
                             in m["content"]["data"])
    assert view["content"]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] == model_id
    assert view["parent_header"]["msg_id"] == cell_id  # in the calling cell

    frontend.send("comm_msg", {"comm_id": model_id, "data": {"method": "update", "state": {"value": 7},
                                                             "buffer_paths": []}})
    # the isolated kernel took the update (its echo), then the notebook kernel is idle again: every
    # output of the callback is out by then, however slow the machine
    frontend.wait_for(lambda m: m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == model_id
                      and m["content"]["data"].get("method") == "echo_update"
                      and m["content"]["data"]["state"].get("value") == 7, timeout=300)
    frontend.run("pass")  # (after the widget's message: the notebook kernel handles one at a time)
    said = frontend.wait_for(is_stream("moved to 7"), timeout=0)  # the callback ran in the isolated kernel
    assert said["parent_header"]["msg_id"] == cell_id  # and printed into the cell that made the widget

    frontend.run("import fal_magic; fal_magic.shutdown()")
    frontend.wait_for(lambda m: m["msg_type"] == "comm_close" and m["content"]["comm_id"] == model_id)
    frontend.wait_for(is_stream("they no longer respond"))


def test_tqdm_auto_without_ipywidgets_is_a_text_bar_without_a_warning(capsys):
    from fal_magic import isolated

    @isolated(keep_alive=30, requirements=["tqdm"])
    def count(n):
        from tqdm.auto import tqdm

        return sum(1 for _ in tqdm(range(n), desc="rows"))

    assert count(5) == 5
    err = capsys.readouterr().err
    assert "rows: 100%" in err and "5/5" in err
    assert "TqdmWarning" not in err and "IProgress not found" not in err


def test_a_widget_as_an_isolated_cells_value_is_its_out(frontend):
    cell_id = frontend.run("%load_ext fal_magic\nget_ipython().run_cell_magic('isolated', '--requirements ipywidgets', "
                           "'import ipywidgets\\nipywidgets.IntSlider(value=3)')")
    opened = frontend.wait_for(lambda m: m["msg_type"] == "comm_open"
                               and m["content"]["data"]["state"].get("_model_name") == "IntSliderModel")
    assert opened["content"]["data"]["state"]["value"] == 3 and opened["parent_header"]["msg_id"] == cell_id
    result = frontend.wait_for(lambda m: m["msg_type"] == "execute_result" and m["parent_header"]["msg_id"] == cell_id)
    view = result["content"]["data"]["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] == opened["content"]["comm_id"]  # Out[n] is the live widget


def test_a_widget_an_isolated_function_returns_is_its_cells_live_out(frontend):
    """As a local function's widget would: the cell's Out[n] is the widget, and moving it runs its
    callback in the isolated kernel, where the widget stays."""
    cell_id = frontend.run(
        "from fal_magic import isolated\n\n@isolated(keep_alive=120, requirements=['ipywidgets'])\n"
        "def make():\n    import ipywidgets\n\n    s = ipywidgets.IntSlider(value=4)\n"
        "    s.observe(lambda change: print('returned slider at', change['new']), names='value')\n"
        "    return s\n\nmake()")
    opened = frontend.wait_for(lambda m: m["msg_type"] == "comm_open"
                               and m["content"]["data"]["state"].get("_model_name") == "IntSliderModel")
    result = frontend.wait_for(lambda m: m["msg_type"] == "execute_result" and m["parent_header"]["msg_id"] == cell_id)
    model_id = opened["content"]["comm_id"]
    assert result["content"]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] == model_id
    frontend.send("comm_msg", {"comm_id": model_id, "data": {"method": "update", "state": {"value": 5},
                                                             "buffer_paths": []}})
    said = frontend.wait_for(is_stream("returned slider at 5"))
    assert said["parent_header"]["msg_id"] == cell_id


def test_binary_buffers_cross_whole_both_ways(frontend):
    picture = bytes(range(256)) * 64  # 16 KiB, not valid PNG: the widget only carries it
    cell_id = frontend.run(
        "from fal_magic import isolated\n\n@isolated(keep_alive=120, requirements=['ipywidgets'])\n"
        "def picture(data):\n    import ipywidgets as widgets\n    from IPython.display import display\n\n"
        "    image = widgets.Image(value=data, format='png')\n"
        "    image.observe(lambda change: print('new image of', len(change['new']), 'bytes'), names='value')\n"
        f"    display(image)\n\npicture({picture!r})")
    opened = frontend.wait_for(lambda m: m["msg_type"] == "comm_open"
                               and m["content"]["data"]["state"].get("_model_name") == "ImageModel")
    assert opened["content"]["data"]["buffer_paths"] == [["value"]]
    assert bytes(opened["buffers"][0]) == picture  # whole, as binary

    model_id = opened["content"]["comm_id"]
    update = frontend.kc.session.msg("comm_msg", {"comm_id": model_id, "data": {
        "method": "update", "state": {}, "buffer_paths": [["value"]]}})
    frontend.kc.session.send(frontend.kc.shell_channel.socket, update, buffers=[b"\x89PNG" * 1000])
    said = frontend.wait_for(is_stream("new image of 4000 bytes"))  # the kernel got the frontend's buffer
    assert said["parent_header"]["msg_id"] == cell_id


def test_a_slider_of_a_remote_kernel_is_live_too(remote, frontend):  # (the server outlives the frontend)
    from .conftest import TOKEN

    frontend.run(f"import fal_magic\nfal_magic.configure(host={remote!r}, token={TOKEN!r})")
    cell_id = frontend.run(SLIDER)
    opened = frontend.wait_for(lambda m: m["msg_type"] == "comm_open"
                               and m["content"]["data"]["state"].get("_model_name") == "IntSliderModel")
    model_id = opened["content"]["comm_id"]
    frontend.send("comm_msg", {"comm_id": model_id, "data": {"method": "update", "state": {"value": 9},
                                                             "buffer_paths": []}})
    said = frontend.wait_for(is_stream("moved to 9"))  # the callback ran in the server's kernel
    assert said["parent_header"]["msg_id"] == cell_id


def test_an_isolated_kernel_cannot_take_over_a_comm_of_the_notebook(frontend):
    """A comm id is the notebook's once it is open there: an isolated kernel that opens a comm of the
    same id (to receive what the frontend sends the notebook's own widget) gets no bridge for it."""
    frontend.run("from comm import create_comm, get_comm_manager\nmine = create_comm(target_name='notebook.own')\n"
                 "got = []\nmine.on_msg(got.append)")
    frontend.run(
        "from fal_magic import isolated\n\n@isolated(keep_alive=120)\n"
        "def hijack(comm_id):\n    from comm import create_comm\n\n"
        "    create_comm(comm_id=comm_id, target_name='notebook.own', data={})\n\n"
        "hijack(mine.comm_id)\n"
        "print('still ours:', get_comm_manager().comms[mine.comm_id] is mine)")
    frontend.wait_for(is_stream("still ours: True"), timeout=0)
