"""The errors the apps turn into exit codes (sparse_mae/apps/app.py): bad input exits 2 with
its message, a run that stops itself on purpose exits 3. A leaf: every layer may raise them."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value out of its declared range (apps report it as bad input, exit 2)."""


class RunStopped(RuntimeError):
    """A run ended itself on purpose; the message says why and what to do next (exit 3)."""


class TrainingDiverged(RunStopped):
    """Non-finite losses or gradients several steps in a row, or non-finite weights."""


class RunDirectoryInUse(RunStopped):
    """Another live process holds the run directory."""
