"""Plot plumbing shared by every report section: matplotlib's object API (`Figure`, Agg canvas),
never pyplot, so building a report changes no global backend state in the caller's process."""

from __future__ import annotations

import io
import math


def figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def grid(n: int, width: float = 5.2, height: float = 3.6):
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig = figure(width * cols, height * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]
