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
    # tqdm.update per 256 KiB frame was ~20 ms of CPU per 256 MiB (~7 % of a loopback push's
    # client CPU): hand it the bytes in steps of 1/200 of the total (at least 1 MiB)
    step = max(total // 200, 1 << 20)
    pending = 0

    def update(n: int) -> None:
        nonlocal pending
        pending += n
        if pending >= step:
            t.update(pending)
            pending = 0

    def close() -> None:
        nonlocal pending
        if pending:
            t.update(pending)
            pending = 0
        t.close()

    return update, close
