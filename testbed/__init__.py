"""The test bed both the test suite and the benchmarks run on: two sshd "hosts" on this machine
(``hosts``), a Jupyter Server with the extension (``server``), and how a time is taken (``timing``).
It imports nothing from ``tests`` or ``benchmarks``, and neither imports the other."""
