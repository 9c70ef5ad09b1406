"""Helpers that test functions call inside kernels: this module travels by value (conftest registers
it with cloudpickle), since a kernel cannot import the test package."""
from __future__ import annotations


def mapped_file(array) -> str | None:
    """The file in fal_magic's shared-memory directories that an array's memory maps, if any (read
    from the calling process's own memory map: in the kernel when called there)."""
    import ctypes

    address = ctypes.addressof(ctypes.c_char.from_buffer(array))
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 and fields[5].startswith("/dev/shm/fal_magic-") else None
    return None
