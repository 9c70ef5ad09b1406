"""The server side: build environments and their kernelspecs on request; cull kernels nobody holds.

Configured like any server option, e.g. ``--FalMagicServer.orphan_timeout=120``.
"""
from __future__ import annotations

import asyncio
import atexit
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from fal_magic_inside.broker import REMOTE_ENV
from fal_magic_inside.head import HEAD_CERT_ENV, HEAD_ENV, ORPHAN_ENV
from fal_magic_inside.host_template import KEEP_ALIVE_ENV
from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from packaging.version import InvalidVersion, Version
from tornado import web
from tornado.ioloop import PeriodicCallback
from traitlets import Bool, Dict, Float, Int, Unicode
from traitlets.config import LoggingConfigurable
import zmq

from ..config import FalMagic
from ..envs import EnvCache, EnvSpec, Indexes, make_spec
from ..envs.indexes import site_settings
from ..envs.local import looks_local
from ..envs.cache import ensure_private_dir
from ..envs.spec import host_python
from ..masking import mask_credentials
from ..errors import FalMagicError
from ..kernel import forked
from ..kernel.local import TEMPLATE_PROVISIONER
from ..kernel.protocol import kernel_argv, kernel_env
from ..platforms import FORK_BY_DEFAULT
from . import blobs
from .cluster import HostGroups, cluster_spec, head_certificates, head_host, loopback_only, slug
from .ssh import HostUnreachable, close_connections, connection
from .launcher import assemble_launcher

#: Kernelspecs made here are named ``fal_magic-<key>``; the culler looks after kernels of those only.
SPEC_PREFIX = "fal_magic-"

#: Seconds between two heartbeat lines while a build is silent (keeps proxies and clients from timing out).
HEARTBEAT = 5.0


class FalMagicServer(LoggingConfigurable):
    """The extension's settings and its work: environments, kernelspecs, the orphan culler."""

    home = Unicode(
        "", config=True,
        help="Environment cache of this server; empty: $FAL_MAGIC_HOME, else the user cache dir.",
    )
    orphan_timeout = Float(
        300.0, min=1.0, config=True,
        help="Seconds a fal_magic kernel may stay without any host connected before it is shut down "
             "(the host's own keep-alive normally ends it much earlier).",
    )

    kernelspec_metadata = Dict(
        config=True,
        help="Merged into the metadata of every kernelspec written here, e.g. a kernel_provisioner "
             "(gateway_provisioners) that starts the kernels in containers.",
    )
    fork_kernels = Bool(
        FORK_BY_DEFAULT, config=True,
        help="Fork this machine's kernels from a template process per environment that has imported "
             "ipykernel already (a first call then takes less than half the time), unless "
             "kernelspec_metadata names a kernel_provisioner. Default: True on Linux.",
    )
    template_keep_alive = Float(
        300.0, min=0.0, config=True,
        help="Seconds an environment's kernel template (which forks its kernels, here or on a cluster "
             "host) stays after its last kernel there ended.",
    )
    machine_types = Dict(
        config=True,
        help="Groups of hosts that kernels of a machine_type run on, over SSH (gateway_provisioners' "
             "DistributedProvisioner): {'S': {'hosts': ['node1', 'node2'], 'env': {...}}}. Empty: every "
             "kernel runs here.",
    )
    default_machine_type = Unicode(
        "", config=True,
        help="The machine type of kernels asked for without one (empty: they run on this server's machine).",
    )
    shared_cache = Bool(
        False, config=True,
        help="The environment cache is on a filesystem every host mounts at the same path: environments "
             "are built once, here, instead of on each host.",
    )
    host_python = Unicode(
        sys.executable, config=True,
        help="The Python with fal_magic[cluster] on every host (the same path as here by default).",
    )
    blob_quota = Int(
        2 << 30, min=0, config=True,
        help="Bytes that the large buffers of calls waiting on this server (blobs, in shared memory) may "
             "take together; a call whose buffers do not fit sends them through the websocket instead.",
    )
    head_address = Unicode(
        "", config=True,
        help="host:port at which hosts reach this server (its blob endpoint; a host's kernel exits when it "
             "cannot for orphan_timeout seconds). Empty: this server's ip and port, or where it listens on "
             "every interface, GP_RESPONSE_IP's (else this machine's) address. On https: a name its certificate holds.",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.head_blobs_url = ""  # where a cluster host's kernels fetch and post large frames (set at load)
        self.head_certificates = ""  # what they trust there, when this server is on https (set at load)
        home = Path(self.home).expanduser() if self.home else FalMagic().home_path()
        self.cache = EnvCache(home)
        self.kernelspecs_dir = home / "kernelspecs"
        self._unheld_since: dict[str, float] = {}
        self.groups = HostGroups(self.machine_types, self.host_python, home)

    def prepare(self, spec: EnvSpec, progress: Callable[[str], None],
                machine_type: str | None = None) -> tuple[str, str | None]:
        """Build (or find) ``spec``'s environment and write its kernelspec; return the kernelspec name
        and the host its kernels run on (None: this one). With a ``machine_type``, on the group's next
        host (see cluster.py).

        Runs in a worker thread. The environment stays held (its shared lock) while the server runs.
        """
        if machine_type is not None:
            return self._prepare_on_host(spec, progress, machine_type)
        spec = spec.resolved(site_settings(Indexes()))  # the server's own pip and uv configuration
        env = self.cache.get(spec, progress)
        name = SPEC_PREFIX + spec.key
        self._write_kernelspec(name, spec, {
            "argv": kernel_argv(str(env.python)),
            "env": {**kernel_env(env.path, "${PATH}"), REMOTE_ENV: "1"},  # ${PATH}: the server's, at start
            "metadata": self._own_metadata(),
        })
        return name, None

    def _own_metadata(self) -> dict[str, Any]:
        """The metadata of a kernelspec for this machine: the configured one, forking its kernels from
        templates unless it names a provisioner of its own."""
        if not self.fork_kernels or "kernel_provisioner" in self.kernelspec_metadata:
            return dict(self.kernelspec_metadata)
        return {**self.kernelspec_metadata, "kernel_provisioner": {"provisioner_name": TEMPLATE_PROVISIONER}}

    def _prepare_on_host(self, spec: EnvSpec, progress: Callable[[str], None],
                         machine_type: str) -> tuple[str, str | None]:
        group = self.groups.group(machine_type)
        spec = cluster_spec(spec)
        if self.shared_cache:  # one build, here, under the cache's own lock: every host sees it
            env = self.cache.get(spec, progress)
            python, launcher = str(env.python), str(assemble_launcher(env.path))
        unreachable = []
        for _ in group["hosts"]:  # a host that cannot be reached is passed over, once per request
            host = self.groups.next_host(machine_type)
            try:
                if self.shared_cache:
                    connection(host)
                else:
                    python, launcher = self.groups.build_on(host, spec, progress)
                break
            except HostUnreachable as exc:
                progress(f"{exc}; trying the next host of {machine_type}")
                unreachable.append(host)
        else:
            raise HostUnreachable(f"no host of machine type {machine_type} can be reached "
                                  f"({', '.join(unreachable)})")
        name = f"{SPEC_PREFIX}{spec.key}-{slug(machine_type)}-{slug(host)}"
        env_path = Path(python).parent.parent
        self._write_kernelspec(name, spec, {
            "argv": [python, launcher, "--kernel-id", "{kernel_id}", "--port-range", "{port_range}",
                     "--response-address", "{response_address}", "--public-key", "{public_key}",
                     "--kernel-class-name", "ipykernel.ipkernel.IPythonKernel"],
            "env": {**kernel_env(env_path, "${PATH}"), **group["env"], REMOTE_ENV: "1",
                    HEAD_ENV: self.head_address, ORPHAN_ENV: str(self.orphan_timeout),
                    KEEP_ALIVE_ENV: str(self.template_keep_alive),
                    **({HEAD_CERT_ENV: self.head_certificates} if self.head_certificates else {})},
            "metadata": {"kernel_provisioner": {"provisioner_name": "fal-magic-host-provisioner", "config": {
                "remote_hosts": [host], "load_balancing_algorithm": "round-robin"}}},
        }, host=host, machine_type=machine_type)
        return name, host

    def _write_kernelspec(self, name: str, spec: EnvSpec, parts: dict[str, Any], **about: str) -> None:
        spec_dir = ensure_private_dir(ensure_private_dir(self.kernelspecs_dir) / name)
        shown = [mask_credentials(r) for r in spec.requirements]
        kernel_json = {
            "argv": parts["argv"],
            "display_name": f"fal_magic {', '.join(shown) or 'no requirements'}",
            "language": "python",
            "interrupt_mode": "signal",
            "env": parts["env"],
            "metadata": {**parts["metadata"], "fal_magic": {"key": spec.key, "requirements": shown, **about}},
        }
        _write_if_changed(spec_dir / "kernel.json", json.dumps(kernel_json, indent=1))

    async def cull(self, kernel_manager: Any) -> None:
        """Shut down orphaned kernels, then stop this machine's templates idle for ``template_keep_alive``."""
        await self.cull_orphans(kernel_manager)
        await asyncio.to_thread(forked.retire_idle, self.template_keep_alive)

    async def cull_orphans(self, kernel_manager: Any) -> None:
        """Shut down fal_magic kernels that have had no websocket connection for ``orphan_timeout``."""
        now = time.monotonic()
        live = set()
        for model in kernel_manager.list_kernels():
            if not str(model.get("name", "")).startswith(SPEC_PREFIX):
                continue
            kid = model["id"]
            live.add(kid)
            if model.get("connections", 0) > 0:
                self._unheld_since.pop(kid, None)
                continue
            since = self._unheld_since.setdefault(kid, now)
            if now - since >= self.orphan_timeout:
                self.log.info("fal_magic: shutting down kernel %s: no host connected for %.0fs", kid, now - since)
                self._unheld_since.pop(kid, None)
                live.discard(kid)
                try:
                    await ensure_async(kernel_manager.shutdown_kernel(kid))
                except Exception:
                    self.log.warning("fal_magic: could not shut down kernel %s", kid, exc_info=True)
        for kid in set(self._unheld_since) - live:
            del self._unheld_since[kid]


def _write_if_changed(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically, unless it holds that already. Concurrent requests for
    one environment each write their own temporary file, so their renames cannot race."""
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


#: Bounds on a request: a requirement list longer than this is refused before anything is built.
MAX_REQUIREMENTS = 1000
MAX_REQUIREMENT_LENGTH = 2000


class EnvsHandler(blobs.TokenNeeded, APIHandler):
    """``POST /fal_magic/api/envs`` with ``{"requirements", "python", "cloudpickle"}``: JSON lines of
    ``{"progress"}``, then ``{"kernel_name", "key", "host"}`` (and ``"blobs"``, the blob directory,
    when the kernel will run on this machine) or ``{"error", "type"}``."""

    auth_resource = "kernels"  # building an env is as powerful as starting a kernel

    @property
    def ext(self) -> FalMagicServer:
        return self.settings["fal_magic"]

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.get_json_body() or {}
        if not isinstance(body, dict):
            raise web.HTTPError(400, "expected a JSON object with requirements, python and cloudpickle")
        requirements, python, cloudpickle = body.get("requirements"), body.get("python"), body.get("cloudpickle")
        if not isinstance(requirements, list) or not all(isinstance(r, str) for r in requirements) \
                or not isinstance(python, str) or not isinstance(cloudpickle, str):
            raise web.HTTPError(400, "expected JSON with requirements (a list of strings), python and "
                                     "cloudpickle (strings)")
        if len(requirements) > MAX_REQUIREMENTS or any(len(r) > MAX_REQUIREMENT_LENGTH for r in requirements):
            raise web.HTTPError(400, f"at most {MAX_REQUIREMENTS} requirements of at most "
                                     f"{MAX_REQUIREMENT_LENGTH} characters each")
        try:
            Version(cloudpickle)
        except InvalidVersion:
            raise web.HTTPError(400, f"cloudpickle must be a version number, not {cloudpickle[:80]!r}") from None
        if python != host_python():
            raise web.HTTPError(409, f"this server runs {host_python()} and the host {python}: pickled functions "
                                     "cannot cross between Python versions")
        try:
            if any(looks_local(r) for r in requirements):
                raise FalMagicError("local package paths cannot be built by a server")
            spec = EnvSpec(requirements=make_spec(requirements).requirements, python=python, cloudpickle=cloudpickle)
        except FalMagicError as exc:
            raise web.HTTPError(400, str(exc)) from None
        machine_type = None
        if self.ext.groups.groups:  # (no groups: as before, machine_type is only recorded)
            machine_type = body.get("machine_type") or self.ext.default_machine_type or None
        if machine_type is not None:
            try:
                self.ext.groups.group(machine_type if isinstance(machine_type, str) else repr(machine_type))
            except FalMagicError as exc:
                raise web.HTTPError(400, str(exc)) from None
        self.set_header("Content-Type", "application/x-ndjson")
        self.set_header("Cache-Control", "no-cache")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def progress(text: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, {"progress": text})

        build = loop.run_in_executor(None, self.ext.prepare, spec, progress, machine_type)
        getter: asyncio.Future | None = None
        while not build.done():
            getter = getter or asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({build, getter}, timeout=HEARTBEAT, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                self.write(json.dumps(getter.result()) + "\n")
                getter = None
            elif not done:
                self.write("\n")
            await self.flush()
        if getter is not None:
            getter.cancel()
        while not events.empty():
            self.write(json.dumps(events.get_nowait()) + "\n")
        try:
            name, host = build.result()
        except FalMagicError as exc:
            self.write(json.dumps({"error": str(exc), "type": type(exc).__name__}) + "\n")
        else:
            answer: dict[str, Any] = {"kernel_name": name, "key": spec.key, "host": host}
            if host is None and "kernel_provisioner" not in self.ext.kernelspec_metadata:
                answer["blobs"] = str(self.settings["fal_magic_blobs"].dir)  # its kernels run on this machine
            elif host is not None:  # a cluster host's kernels fetch and post them over HTTP
                answer["head_blobs"] = self.ext.head_blobs_url
            self.write(json.dumps(answer) + "\n")
        await self.finish()


#: How often the server's sockets retry a connection to a kernel that does not listen yet, in ms.
RECONNECT_EVERY_MS = 10

#: How often a new websocket of a fal_magic kernel asks the kernel for its info until the server's
#: iopub subscription is seen live. jupyter_server's nudge asks again only every 0.5 s, and about one
#: first try in four here was lost to ZeroMQ's slow joiner: a first call then took ~0.8 s, not ~0.3.
NUDGE_EVERY = 0.05


def _connection_class(base: type) -> type:
    """The server's kernel websocket connection class, for fal_magic kernels with Nagle's algorithm
    off and a quicker nudge.

    A call's small replies (status, result) would otherwise wait for the host's delayed ACK (~40 ms
    each round trip on Linux); jupyter_server leaves the kernel websocket's TCP_NODELAY unset.
    """

    class FalMagicConnection(base):
        def ours(self) -> bool:
            return str(getattr(self.kernel_manager, "kernel_name", "")).startswith(SPEC_PREFIX)

        def connect(self) -> Any:
            handler = self.websocket_handler
            if self.ours() and getattr(handler, "ws_connection", None) is not None:
                handler.set_nodelay(True)
            return super().connect()

        def nudge(self) -> Any:
            """jupyter_server's nudge, with more kernel_info_requests meanwhile (each makes the
            kernel publish its status on iopub, which is what the nudge waits to see)."""
            done = super().nudge()
            if done.done() or not self.ours():
                return done
            shell = self.kernel_manager.connect_shell()  # (its replies are nobody's: closed after)
            loop = asyncio.get_running_loop()

            def ask() -> None:
                if not done.done() and not shell.closed():
                    self.session.send(shell, "kernel_info_request")
                    loop.call_later(NUDGE_EVERY, ask)

            loop.call_later(NUDGE_EVERY, ask)
            done.add_done_callback(lambda _: shell.close())
            return done

    return FalMagicConnection


def load(serverapp: Any) -> None:
    """Register the endpoint, make the server find our kernelspecs, and start the orphan culler."""
    ext = FalMagicServer(parent=serverapp, log=serverapp.log)
    ensure_private_dir(ext.cache.home)
    ensure_private_dir(ext.kernelspecs_dir)
    specs = serverapp.kernel_spec_manager
    if str(ext.kernelspecs_dir) not in specs.kernel_dirs:
        specs.kernel_dirs = [*specs.kernel_dirs, str(ext.kernelspecs_dir)]
    web_app = serverapp.web_app
    web_app.settings["fal_magic"] = ext
    if ext.machine_types:  # what a host's kernels need of this server
        if not ext.head_address and loopback_only(serverapp.ip):
            serverapp.log.warning(
                "fal_magic: this server listens on %s only, where kernels on other machines cannot reach it "
                "(for large buffers, and to see it still runs: they end after orphan_timeout). Set "
                "--ServerApp.ip, or --FalMagicServer.head_address if hosts reach it through a tunnel.",
                serverapp.ip)
        ext.head_address = ext.head_address or f"{head_host(serverapp.ip)}:{serverapp.port}"
        scheme = "https" if serverapp.certfile else "http"
        ext.head_blobs_url = url_path_join(f"{scheme}://{ext.head_address}", web_app.settings["base_url"],
                                           "fal_magic", "api", "blobs")
        ext.head_certificates = head_certificates(serverapp.certfile) if serverapp.certfile else ""
    # the server connects to a new kernel before it listens: retry every 10 ms, not zmq's 100 ms, which
    # a first call paid in full (or twice) while the kernel came up
    serverapp.kernel_manager.context.setsockopt(zmq.RECONNECT_IVL, RECONNECT_EVERY_MS)
    connection_class = web_app.settings.get("kernel_websocket_connection_class")
    if connection_class is not None:
        web_app.settings["kernel_websocket_connection_class"] = _connection_class(connection_class)
    route = url_path_join(web_app.settings["base_url"], "fal_magic", "api", "envs")
    web_app.add_handlers(".*$", [(route, EnvsHandler)])
    atexit.register(blobs.add_handlers(web_app, ext.blob_quota).close)
    atexit.register(close_connections)
    atexit.register(forked.stop_all)
    culler = PeriodicCallback(lambda: asyncio.ensure_future(ext.cull(serverapp.kernel_manager)),
                              1000 * min(5.0, ext.orphan_timeout / 2, max(ext.template_keep_alive, 0.1)))
    culler.start()
    serverapp.log.info("fal_magic: environments in %s; kernels without a host are shut down after %gs",
                       ext.cache.home, ext.orphan_timeout)
