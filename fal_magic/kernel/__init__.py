"""Running kernels: the in-kernel runtime, the wire format, one warm kernel, and the pool of them."""
from .pool import KernelInfo, KernelPool, get_pool

__all__ = ["KernelInfo", "KernelPool", "get_pool"]
