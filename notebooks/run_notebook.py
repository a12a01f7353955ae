"""Execute a notebook headless with a real Jupyter kernel and print what each cell showed.

    python3 notebooks/run_notebook.py notebooks/quickstart.ipynb

The executed copy is saved beside it as ``<name>.out.ipynb``; the exit status is non-zero if a
cell failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def main(path: str) -> int:
    src = Path(path)
    nb = nbformat.read(src, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(src.parent)}})
    failed = None
    try:
        client.execute()
    except CellExecutionError as exc:
        failed = exc
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        print(f"In [{cell.execution_count or ' '}]: " + cell.source.splitlines()[0])
        for out in cell.outputs:
            if out.output_type == "stream":
                sys.stdout.write("".join("    " + line for line in out.text.splitlines(True)))
            elif out.output_type in ("display_data", "execute_result"):
                kinds = ", ".join(k for k in out.data if k != "text/plain")
                text = out.data.get("text/plain", "")
                print("    " + (f"[{kinds}] " if kinds else "") + text.splitlines()[0] if text else f"    [{kinds}]")
            elif out.output_type == "error":
                print(f"    ERROR {out.ename}: {out.evalue}")
    dest = src.with_suffix(".out.ipynb")
    nbformat.write(nb, dest)
    print(f"\nExecuted notebook saved to {dest}")
    if failed is not None:
        print(f"A cell failed: {str(failed).splitlines()[-1] if str(failed) else failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).with_name("quickstart.ipynb"))))
