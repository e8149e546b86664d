"""Version checks shared by the patches: fail loudly on a framework release we have not tested."""
from __future__ import annotations

import re
from typing import Tuple


class UnsupportedFrameworkError(RuntimeError):
    """The installed framework release or its parallel layout is not supported by a patch."""


def release_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def require_release(framework: str, version: str, supported_prefixes: Tuple[str, ...]) -> None:
    """Raise unless ``version`` starts with one of ``supported_prefixes`` (e.g. ``("0.19.",)``)."""
    if not any(version.startswith(prefix) for prefix in supported_prefixes):
        allowed = ", ".join(prefix + "x" for prefix in supported_prefixes)
        raise UnsupportedFrameworkError(
            f"lshmoe-plugin supports {framework} {allowed}; found {framework} {version}")
