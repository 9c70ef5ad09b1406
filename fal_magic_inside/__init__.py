"""The code that runs inside a fal_magic kernel (and its template), and the wire format both sides share.

The host ships this package into each kernel (a copy on the kernel's ``sys.path``, or its sources in
the bootstrap cell of a kernel on a server), so environments need no fal_magic install. Its modules
import the standard library, cloudpickle and what every kernel has (ipykernel and its zmq), never
the host's ``fal_magic``: ``tests/test_layout.py`` holds it to that.

- ``frames``: pickle-5 frames, exception descriptions, the message signature
- ``shm``: shared-memory segments (an arena per side) and server blobs for large buffers
- ``cached``: ``@cached``, results kept in the warm kernel
- ``capture``: what subprocesses write to descriptor 1, drained into the call's output
- ``stdin``: ``input()``, ``getpass()``, ``sys.stdin`` and debuggers in a call ask the host
- ``broker``: nested isolated calls, asked of the host (and the proxy an isolated function becomes)
- ``channel``: the kernel's own socket for calls (the local fast channel)
- ``head``: a cluster host's kernel ends when its server is gone
- ``runtime``: the comm target and request handler that wire them together; ``install``
- ``forkserver``: the template process kernels are forked from (run as a script)
- ``host_template``: a cluster host's kernels forked from a template there (run as a script)
"""
