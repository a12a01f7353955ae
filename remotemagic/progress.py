"""Progress bars for transfers (tqdm; a notebook widget where ipywidgets is installed)."""

from __future__ import annotations

from typing import Any, Callable

SHOW_ABOVE = 16 * 1024 * 1024  # bytes: smaller transfers finish before a bar is worth drawing


def bar(total: int, desc: str, enabled: bool = True) -> tuple[Callable[[int], None], Callable[[], None]]:
    """Return ``(update(nbytes), close())`` for a byte progress bar, or no-ops when small."""
    if not enabled or total < SHOW_ABOVE:
        return (lambda n: None), (lambda: None)
    from tqdm.auto import tqdm

    t: Any = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
    return t.update, t.close
