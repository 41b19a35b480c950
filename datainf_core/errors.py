"""Exceptions raised for user mistakes.

Every message is one line that names what is wrong, the value seen, and what to do instead. The CLI
prints it without a traceback and exits with status 2; the app shows it with ``st.error``.
"""

from __future__ import annotations


class DataInfError(Exception):
    """Base class of every user-facing error (bad input, bad settings, missing files)."""


class ProjectError(DataInfError):
    """A ``project.toml`` field, path or setting is invalid."""


class DataError(DataInfError):
    """A train/validation file cannot be read or does not fit the project settings."""


class ModelError(DataInfError):
    """The base model or adapter cannot be loaded, or does not fit the task."""


class StoreError(DataInfError):
    """The on-disk gradient store cannot be written or read."""


class InfluenceInputError(DataInfError, ValueError):
    """Gradients given to the influence engine are inconsistent (blocks, shapes, NaN/inf)."""
