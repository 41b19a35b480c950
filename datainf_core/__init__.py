"""DataInf Studio core: per-sample LoRA gradients → influence scores → review → export."""

from __future__ import annotations

from typing import Any

__all__ = ["compute_influence", "compute_self_influence"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so `import datainf_core` (the CLI, the app) does not pay for torch until it is needed.
    if name in __all__:
        from datainf_core import influence

        return getattr(influence, name)
    raise AttributeError(f"module 'datainf_core' has no attribute {name!r}")
