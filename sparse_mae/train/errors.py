"""Errors by which a run stops itself on purpose; the apps exit with code 3 and the message."""
from __future__ import annotations


class RunStopped(RuntimeError):
    """A run ended itself on purpose; the message says why and what to do next."""


class TrainingDiverged(RunStopped):
    """Non-finite losses or gradients several steps in a row, or non-finite weights."""


class RunDirectoryInUse(RunStopped):
    """Another live process holds the run directory."""
