"""The command line of :mod:`.aot_check`: a parser whose errors are one line, and the argument
types that check each value as it is parsed, before anything is compiled."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lash_kernels.aot_types import ARCHS


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """Bad input: one line naming the flag and the value, exit code 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def arch_list(text: str) -> tuple[int, ...]:
    """``sm_80,sm_90`` → ``(80, 90)``, each one of :data:`ARCHS`."""
    archs = tuple(int(a.strip().removeprefix("sm_")) for a in text.split(",") if a.strip())
    unknown = [a for a in archs if a not in ARCHS]
    if unknown or not archs:
        raise argparse.ArgumentTypeError(f"--archs {text!r}: allowed values are {', '.join(f'sm_{a}' for a in ARCHS)}")
    return archs


def name_list(allowed: dict):
    """The type of a comma-separated list of ``allowed``'s keys."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        if not names or any(n not in allowed for n in names):
            raise argparse.ArgumentTypeError(f"{text!r}: allowed values are {', '.join(allowed)}")
        return names

    return parse


def output_file(text: str) -> Path:
    """A path a file can be written to: not a directory, in a directory that exists and is writable."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file path")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: the directory {str(path.parent)!r} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: the directory {str(path.parent)!r} is not writable")
    return path
