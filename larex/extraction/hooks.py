"""Find a submodule by dotted path and capture its forward input or output with hooks."""
from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class LayerNotFoundError(KeyError):
    """A dotted module path that does not exist in the model."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule of ``model`` at dotted ``path`` (e.g. ``"layer3.1.conv2"``; ``""`` = model).

    Raises:
        LayerNotFoundError: the path does not exist; the message lists the closest valid names.
    """
    if not isinstance(path, str):
        raise TypeError(f"layer path must be a dotted string such as 'layer3'; got {type(path).__name__}")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Module):
        names = [name for name, _ in model.named_modules() if name]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
        hint = f"closest valid names: {close}" if close else "no similar name found"
        raise LayerNotFoundError(
            f"layer {path!r} not found in {type(model).__name__}; {hint}. "
            f"Print all names with: print([n for n, _ in model.named_modules()])")
    return module


def _detach(value: Any) -> Any:
    """``value`` with every tensor detached (tuples, lists and dicts are walked)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        items = [_detach(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


class Capture:
    """What a hook recorded: ``value`` (the last call's tensor(s), detached) and ``calls``."""

    def __init__(self) -> None:
        self.value: Any = None
        self.calls: int = 0

    def record(self, value: Any) -> None:
        self.value = _detach(value)
        self.calls += 1


class _StopForward(Exception):
    """Raised by a ``stop_forward`` hook to abandon the rest of the forward pass."""


@contextmanager
def capture_output(module: nn.Module, stop_forward: bool = False) -> Iterator[Capture]:
    """Record ``module``'s forward output while the context is open; the hook is removed on exit.

    With ``stop_forward=True`` the forward pass is abandoned right after ``module`` ran (the rest of
    the network is skipped and the ``with`` body ends there); use it when only this output is needed.
    """
    cap = Capture()

    def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
        cap.record(out)
        if stop_forward:
            raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield cap
    except _StopForward:
        pass
    finally:
        handle.remove()


@contextmanager
def capture_input(module: nn.Module) -> Iterator[Capture]:
    """Record ``module``'s first positional forward input (e.g. ``penultimate`` = input of the head)."""
    cap = Capture()

    def hook(_m: nn.Module, args: tuple) -> None:
        if not args:
            raise ValueError(f"capture_input: {type(_m).__name__} was called without a positional "
                             "input; hook a module whose forward takes the tensor positionally")
        cap.record(args[0])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()
