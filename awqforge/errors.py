"""The engine's exception hierarchy: callers (CLI, worker) catch `AWQForgeError` and show its message.

`InputError` covers everything wrong with what the user asked for (a path that does not exist, weights that are
not safetensors, a group size that does not fit, a calibration source with too little text); the job can be
fixed by changing the request. `NumericalError` and `UnsupportedArchitecture` are raised by the algorithm
(`awqforge.awq`, `awqforge.arch`) and re-exported here; `engine_errors()` lists every type to catch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from awqforge.arch import UnsupportedArchitecture
    from awqforge.awq import NumericalError


class AWQForgeError(Exception):
    """Base of every error the engine raises on purpose, with a message meant for the user."""


class InputError(AWQForgeError, ValueError):
    """The request cannot be served as given: bad path, weights format, settings or calibration source."""


class HubUnavailable(AWQForgeError):
    """The Hugging Face Hub could not be reached (offline, no network, auth) and nothing usable is cached."""


class JobCancelled(AWQForgeError):
    """The caller's cancel() returned True between two blocks; partial output has been removed."""


def __getattr__(name: str):
    # The algorithm owns these two (awqforge.awq, awqforge.arch); re-exported here, lazily (they import torch),
    # so that callers find every engine error in one place.
    if name == "NumericalError":
        from awqforge.awq import NumericalError

        return NumericalError
    if name == "UnsupportedArchitecture":
        from awqforge.arch import UnsupportedArchitecture

        return UnsupportedArchitecture
    raise AttributeError(f"module 'awqforge.errors' has no attribute {name!r}")


def engine_errors() -> tuple[type[Exception], ...]:
    """Every exception type that carries a message meant for the user (for the CLI and the worker to catch)."""
    from awqforge.arch import UnsupportedArchitecture
    from awqforge.awq import NumericalError

    return (AWQForgeError, NumericalError, UnsupportedArchitecture)


def describe(exc: BaseException) -> str:
    """One readable line for any failure: the message of an engine error; for anything else (a bug, or a
    library failing in a way we did not foresee) its type and message, marked as unexpected."""
    if isinstance(exc, engine_errors()):
        return str(exc) or type(exc).__name__
    if isinstance(exc, (MemoryError, *torch_oom_errors())):
        return f"out of memory ({type(exc).__name__}): use a smaller calibration set or another device"
    text = " ".join(str(exc).split())[:1000]
    return f"unexpected {type(exc).__name__}" + (f": {text}" if text else "")


def torch_oom_errors() -> tuple[type[Exception], ...]:
    try:
        import torch

        return (torch.cuda.OutOfMemoryError,)
    except (ImportError, AttributeError):  # pragma: no cover
        return ()


__all__ = [
    "AWQForgeError",
    "InputError",
    "HubUnavailable",
    "JobCancelled",
    "NumericalError",
    "UnsupportedArchitecture",
    "engine_errors",
    "describe",
]
