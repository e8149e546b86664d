"""Version checks shared by the patches: fail loudly on a framework release we have not tested."""
from __future__ import annotations

from typing import Tuple

# The DeepSpeed releases both DeepSpeed patches (GShard MOELayer and AutoEP) are checked against.
DEEPSPEED_RELEASES = ("0.19.",)


class UnsupportedFrameworkError(RuntimeError):
    """The installed framework release or its parallel layout is not supported by a patch."""


def require_release(framework: str, version: str, supported_prefixes: Tuple[str, ...]) -> None:
    """Raise unless ``version`` starts with one of ``supported_prefixes`` (e.g. ``("0.19.",)``)."""
    if not any(version.startswith(prefix) for prefix in supported_prefixes):
        allowed = ", ".join(prefix + "x" for prefix in supported_prefixes)
        raise UnsupportedFrameworkError(
            f"lshmoe-plugin supports {framework} {allowed}; found {framework} {version}")


def require_deepspeed() -> str:
    """The installed DeepSpeed version, after checking it is one the DeepSpeed patches support."""
    import deepspeed
    require_release("deepspeed", deepspeed.__version__, DEEPSPEED_RELEASES)
    return deepspeed.__version__
