"""The command registry: ``@command`` puts ``_cmd_<name>`` and its parser set-up in :data:`COMMANDS`."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["COMMANDS", "arguments", "command"]

Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help_text: str, example: str) -> Callable:
    """Register ``_cmd_<name>`` with its one-line help and a usage example."""

    def wrap(fn: Callable) -> Callable:
        setup = getattr(fn, "_setup", lambda p: None)
        COMMANDS[name] = (help_text, example, setup, fn)
        return fn

    return wrap


def arguments(setup: Callable[[argparse.ArgumentParser], None]) -> Callable:
    def wrap(fn: Callable) -> Callable:
        fn._setup = setup  # type: ignore[attr-defined]
        return fn

    return wrap
