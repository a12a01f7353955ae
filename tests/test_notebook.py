"""notebooks/quickstart.ipynb, executed headless by a real Jupyter kernel (nbclient)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from .conftest import stop_workers

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _texts(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_quickstart_end_to_end(_isolated_state: Path) -> None:
    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        client.execute()  # raises CellExecutionError on the first failing cell
    finally:
        stop_workers(_isolated_state / "local-target")
    cells = {c.source.splitlines()[0]: c for c in nb.cells if c.cell_type == "code"}
    for c in cells.values():
        assert not [o for o in c.outputs if o.output_type == "error"], c.source
    assert "got 1,000,000 values" in _texts(cells["%%ec2 run -i data -o stats"])
    assert "mean=10.0" in _texts(cells['# `stats` is now a local variable'])
    plot = next(c for c in nb.cells if "plt.show()" in c.source)
    assert any("image/png" in o.get("data", {}) for o in plot.outputs), "the remote figure is not inline"
    store = _texts(cells["%ec2_store stats"])
    assert "Stored 'stats' (dict)" in store and "Restored 'stats' (dict)" in store
    assert "big_remote_thing" in _texts(cells["%ec2_store --remote big_remote_thing"])
    waited = _texts(cells["%ec2 wait"])
    assert "step 4: total=10" in waited and "total pulled back: 10" in waited
    assert "step 0: total=0" in _texts(cells["%ec2 output"])
