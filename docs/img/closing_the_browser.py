"""Makes docs/img/closing-the-browser.png: a page closed mid-run and opened again.

    python docs/img/closing_the_browser.py      (needs the test extra and /usr/bin/chromium)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from playwright.sync_api import sync_playwright  # noqa: E402

from tests import test_browser as tb  # noqa: E402

CELL = """%%ec2 run
import time
for epoch in range(1, 21):
    time.sleep(1)
    print(f"epoch {epoch:2d}  loss={1 / epoch:.3f}", flush=True)"""


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    lab = tb.Lab(tmp, tmp / "state")
    try:
        lab.notebook("train.ipynb", CELL)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=tb.CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            browser.new_context(viewport={"width": 1000, "height": 760})
            pages: list = []
            page = tb.open_notebook(lab, browser, pages, "train.ipynb")
            tb.wait_for("kernel", lambda: tb.kernel_idle(page), timeout=60)
            tb.run_cell(page, 0)
            tb.wait_for("use", lambda: "Using local" in tb.output_text(page, 0), timeout=60)
            tb.run_cell(page, 1)
            tb.wait_for("epoch 3", lambda: "epoch  3" in tb.output_text(page, 1), timeout=60)
            page.close()  # the laptop lid closes
            time.sleep(3)
            page = tb.open_notebook(lab, browser, pages, "train.ipynb")
            tb.wait_for("epoch 9", lambda: "epoch  9" in tb.output_text(page, 1), timeout=60)
            tb.assert_kernel_answers(page, within=10)
            page.screenshot(path=str(HERE / "closing-the-browser.png"))
            browser.close()
    finally:
        lab.stop()


if __name__ == "__main__":
    main()
