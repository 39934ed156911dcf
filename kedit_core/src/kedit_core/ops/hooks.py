"""Hook mechanics every family needs: read what enters or leaves a module, and end a forward pass as
soon as what is needed has been read (the layers above it are never run).

``ops.prefix`` builds on these to replay the layers below an intervention inside an optimization loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; :func:`stop_after` and :func:`stopped` catch it."""


def module_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a module was called with (first positional argument or ``hidden_states``)."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def module_output(output: Any) -> torch.Tensor:
    """The hidden states a module returned (the first element of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture(module: nn.Module, which: str = "input") -> Iterator[list[torch.Tensor]]:
    """Collect, detached, the input or the output of ``module`` on every call inside the block."""
    store: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        store.append((module_input(args, kwargs) if which == "input" else module_output(output)).detach())

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


@contextlib.contextmanager
def stopped() -> Iterator[None]:
    """Swallow the :class:`StopForward` that ends a forward pass early."""
    with contextlib.suppress(StopForward):
        yield


@contextlib.contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """End any forward pass inside the block right after ``module`` ran."""

    def hook(*_: Any) -> None:
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        with stopped():
            yield
    finally:
        handle.remove()


@contextlib.contextmanager
def stop_before(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """End any forward pass inside the block when it reaches ``module``; yields the inputs it would have
    received (detached), so reading a module's input costs only the layers below it."""
    store: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        store.append(module_input(args, kwargs).detach())
        raise StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with stopped():
            yield store
    finally:
        handle.remove()
