"""Package sync benchmark: a bare host to the first cell that imports numpy, pandas and matplotlib.

    python benchmarks/packages.py                 # wheels from .cache/wheelhouse (tests/run.sh fills it)
    python benchmarks/packages.py --wheelhouse DIR --warm-runs 500

One run starts a real sshd on 127.0.0.1 whose sessions see only a bare python3 (the standard
library copied without ensurepip/venv/pip; an empty home; no package index) and measures:

* cold: ``remotemagic.connect`` on the bare host (uv shipped, venv made, cloudpickle + IPython
  installed) until a cell that imports numpy, pandas and matplotlib has run -- wheels fetched
  into an empty local cache, shipped and installed;
* warm: the added cost per cell when nothing needs installing (the package-sync check alone,
  median over many cells), and a whole warm cell with sync on vs off;
* baseline, same host, same pins, same wheel folder: ``python -m venv`` + ``pip install`` of the
  cloudpickle/IPython/numpy/pandas/matplotlib closure (what a user would do by hand).

Ratios are against the baseline of the same run. Everything the run starts it stops; its
temporary folder is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tests.ssh_fixtures import make_bare_python  # noqa: E402
from tests.sshd import SSHServer, require_sshd  # noqa: E402

CELL = "import numpy, pandas, matplotlib\nv = (numpy.__version__, pandas.__version__, matplotlib.__version__)"
COLD_GOAL_S = 15.0
WARM_GOAL_MS = 5.0


def stop_workers(root: Path) -> None:
    from tests.workers import stop_workers as stop

    stop(root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheelhouse", default=str(REPO / ".cache" / "wheelhouse"),
                   help="folder of wheels the client fetches from (default: the test wheelhouse)")
    p.add_argument("--warm-runs", type=int, default=300)
    p.add_argument("--json", default=str(HERE / "results" / "packages.json"))
    args = p.parse_args(argv)
    require_sshd()
    import remotemagic
    from remotemagic import envsync
    from remotemagic.envsync import localenv

    house = os.path.abspath(args.wheelhouse)
    pins = [d.pin for d in localenv.current().closure(frozenset({"cloudpickle", "ipython", "numpy", "pandas",
                                                                   "matplotlib"}))]
    tmp = Path(tempfile.mkdtemp(prefix="rm-bench-pkgs-"))
    os.environ["REMOTEMAGIC_WHEELHOUSE"] = house
    os.environ["REMOTEMAGIC_CACHE_DIR"] = str(tmp / "client-cache")  # empty: cold includes fetching
    os.environ["REMOTEMAGIC_STATE_DIR"] = str(tmp / "state")
    bindir = make_bare_python(tmp / "bare")
    home = tmp / "home"
    home.mkdir(mode=0o700)
    env = {"HOME": str(home), "PATH": f"{bindir}:{tmp / 'bare' / 'tools'}", "PIP_NO_INDEX": "1",
           "PIP_CONFIG_FILE": "/dev/null", "UV_NO_CONFIG": "1", "UV_PYTHON_DOWNLOADS": "never", "PYTHONNOUSERSITE": "1"}
    server = SSHServer(tmp / "sshd", env=env).start()
    cfg = server.write_ssh_config(alias="bench")
    results: dict[str, float] = {}
    root = tmp / "root"
    try:
        # -- cold ----------------------------------------------------------------------------
        t0 = time.perf_counter()
        r = remotemagic.connect("ssh:bench", root=str(root), ssh_config=str(cfg), python="python3",
                                show_progress=False)
        results["cold_connect_s"] = time.perf_counter() - t0
        job = r.run(CELL, pull=["v"])
        assert job.state == "done", job.error()
        results["cold_total_s"] = time.perf_counter() - t0
        # -- warm ----------------------------------------------------------------------------
        times = []
        for _ in range(args.warm_runs):
            t = time.perf_counter()
            envsync.before_upload(r, CELL)
            times.append(time.perf_counter() - t)
        results["warm_check_ms"] = statistics.median(times) * 1000
        results["warm_check_p95_ms"] = sorted(times)[int(len(times) * 0.95) - 1] * 1000
        cells = {}
        for mode in ("auto", "off", "auto", "off"):
            r.package_sync = mode
            t = time.perf_counter()
            for _ in range(20):
                r.run(CELL).result()
            cells.setdefault(mode, []).append((time.perf_counter() - t) / 20)
        results["warm_cell_sync_ms"] = min(cells["auto"]) * 1000
        results["warm_cell_nosync_ms"] = min(cells["off"]) * 1000
        r.close()
        # -- baseline: python -m venv + pip install of the same pins, same host and wheels -------------------
        base = tmp / "baseline"
        py = shlex.quote(getattr(sys, "_base_executable", sys.executable))
        cmd = (f"{py} -m venv {base} && {base}/bin/python -m pip install -q --disable-pip-version-check --no-deps "
               f"--no-index --find-links {shlex.quote(house)} {' '.join(shlex.quote(x) for x in pins)} && "
               f"{base}/bin/python -c {shlex.quote(CELL)}")
        t = time.perf_counter()
        subprocess.run(["ssh", "-F", str(cfg), "bench", cmd], check=True, stdout=subprocess.DEVNULL)
        results["baseline_pip_s"] = time.perf_counter() - t
    finally:
        stop_workers(root)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    rows = [
        ("cold: bare host -> first numpy/pandas/matplotlib cell", f"{results['cold_total_s']:.1f} s",
         f"{results['cold_total_s'] / results['baseline_pip_s']:.2f}x pip", f"<= {COLD_GOAL_S:g} s",
         "PASS" if results["cold_total_s"] <= COLD_GOAL_S else "MISS"),
        ("  of which connect (uv, venv, agent packages)", f"{results['cold_connect_s']:.1f} s", "", "", ""),
        ("baseline: venv + pip install, same pins (host has venv+pip)", f"{results['baseline_pip_s']:.1f} s", "1.00x",
         "", ""),
        ("warm: package-sync check per cell (median)", f"{results['warm_check_ms']:.2f} ms",
         f"p95 {results['warm_check_p95_ms']:.2f} ms", f"<= {WARM_GOAL_MS:g} ms",
         "PASS" if results["warm_check_ms"] <= WARM_GOAL_MS else "MISS"),
        ("warm cell, sync auto vs off", f"{results['warm_cell_sync_ms']:.1f} ms",
         f"{results['warm_cell_sync_ms'] / results['warm_cell_nosync_ms']:.2f}x off "
         f"({results['warm_cell_nosync_ms']:.1f} ms)", "", ""),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"\n{'measure':{w}}  {'value':>10}  {'ratio':24} {'goal':10} status")
    for name, value, ratio, goal, status in rows:
        print(f"{name:{w}}  {value:>10}  {ratio:24} {goal:10} {status}")
    print(f"\n{len(pins)} pins: {' '.join(pins)}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"results": results, "pins": pins, "time": time.time()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
