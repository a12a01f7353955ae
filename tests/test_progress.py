"""Progress bars as a notebook user sees them: a real Jupyter kernel (nbclient) runs a push big
enough for a bar, and the cell's output holds the bar and nothing else."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from .workers import stop_workers


def test_a_big_push_shows_a_bar_and_no_warning_in_a_kernel(tmp_path: Path) -> None:
    """tqdm.auto in a kernel without ipywidgets warns "IProgress not found" into the user's
    cell; our bars fall back to text quietly (widgets are used where ipywidgets is installed)."""
    root = tmp_path / "target"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (
        f"%load_ext remotemagic\n%ec2 use local --root {root}",
        "import numpy as np\nx = np.ones(3 << 20)  # 24 MiB: a bar is drawn above 16 MiB",
        "%%ec2 run -i x -o y\ny = x * 2\nprint('sum', int(y.sum()))",
        "print('pulled', int(y.sum()))",
    )]
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:
        stop_workers(root)
    cell = nb.cells[2]
    stderr = "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stderr")
    stdout = "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")
    assert "push x:" in stderr, stderr[:500]  # the bar was drawn
    assert "Warning" not in stderr and "IProgress" not in stderr, stderr[:500]
    assert stdout == f"sum {2 * (3 << 20)}\n"
    assert not [o for c in nb.cells for o in c.outputs if o.output_type == "error"]
    assert "".join(o.get("text", "") for o in nb.cells[3].outputs) == f"pulled {2 * (3 << 20)}\n"
