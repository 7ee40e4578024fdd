"""Matplotlib for PNG output on a machine without a display (the Agg backend, chosen before pyplot loads)."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(**kwargs: Any) -> Any:
    """A ``matplotlib.figure.Figure`` not registered with pyplot (no global state; ``fig.savefig`` writes it)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(**kwargs)
