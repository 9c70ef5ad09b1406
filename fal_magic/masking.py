"""Secrets kept out of what fal_magic shows: the credentials in a URL are masked before the URL reaches
a progress line, an error, a log line or the kernel list. Ground floor: imports nothing of fal_magic."""
from __future__ import annotations

import re

_CREDENTIALS = re.compile(r"(?<=://)([^/@\s:]+)(:[^/@\s]*)?@")


def mask_credentials(text: str) -> str:
    """``https://alice:S3CRET@host/x`` -> ``https://alice:****@host/x`` and ``https://TOKEN@host`` ->
    ``https://****@host`` (as uv shows them): a URL's secret never reaches a progress line or an error."""
    return _CREDENTIALS.sub(lambda m: f"{m.group(1)}:****@" if m.group(2) else "****@", text)
