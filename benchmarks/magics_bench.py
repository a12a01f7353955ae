"""The benchmark's contenders through the magics -- what users actually run.

``%%ec2 run`` on an IPython ``InteractiveShell`` (in the benchmark's process) and in a real
Jupyter kernel (``jupyter_client``), each timed against the plain API (``Remote.run``, no
progress bars: the API benchmark's settings) on the same connection, session and remote
namespace, interleaved repetition by repetition. The remote namespace is empty, or holds
300 000 small dicts, a ~150 MiB pandas DataFrame with a string column, or a large numpy array.

:func:`drive` does the measuring; it runs where the magics run (this process for the shell,
the kernel for the kernel) and returns plain numbers that ``run.py`` turns into rows.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from typing import Any

# (key, label, the cell that fills the remote namespace); ``{array_bytes}`` is filled in
NAMESPACES = [
    ("empty", "empty", ""),
    ("dicts", "300 000 small dicts",
     "objs = [{'id': i, 'name': 'item %d' % i, 'tags': [i, i + 1]} for i in range(300_000)]"),
    ("frame", "DataFrame ~150 MiB, string column",
     "import numpy as np, pandas as pd\nn = 2_000_000\n"
     "df = pd.DataFrame({'x': np.arange(n, dtype='float64'), 'k': np.arange(n) % 7, "
     "'s': ['row %d' % i for i in range(n)]})\n"
     "print('DataFrame: %.0f MiB' % (df.memory_usage(deep=True).sum() / 2**20))"),
    ("array", "numpy array {array_label}", "import numpy as np\nbig = np.ones({array_bytes} // 8)"),
]


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


def _in_turn(rep: int, *contenders: tuple[str, list[float]]) -> tuple[tuple[str, list[float]], ...]:
    """The contenders in turn: the first of a repetition comes last in the next. (The first
    transfer of a series -- the first pull after the pushes -- met colder memory and caches than
    the rest: 2.2 s where the next took 1.2-1.4 s; a round before the timed ones is not timed.)"""
    return contenders if rep % 2 == 0 else contenders[::-1]


def settle() -> None:
    """Flush dirty pages from the previous step so it does not slow down the next one."""
    os.sync()
    time.sleep(0.2)


def time_copy(cmd: list[str], dest: str, size: int) -> float:
    """Run a copy command (an scp) that writes ``size`` bytes to ``dest``; its wall time. Any
    earlier copy is removed first and this one after."""
    if os.path.exists(dest):
        os.unlink(dest)
    settle()
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    assert os.path.getsize(dest) == size, dest
    os.unlink(dest)
    return elapsed


def drive(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure in the running IPython (shell or kernel) whose Ec2Magics is connected already.

    ``spec``: ``runs`` (warm cells per contender), ``reps`` (timed transfers per contender,
    after one untimed round), ``size`` and ``src`` (the array pushed and pulled, read from a
    random file), ``root`` (the remote root: each pull's previous ``-o`` file is deleted, as
    scp's previous copy is),
    ``namespaces`` ([key, setup cell]) and ``transfer`` (the keys whose transfers are timed);
    ``scp``: the scp commands (``upload``, ``download``) and the files they write
    (``upload_dest``, ``download_dest``), run interleaved with each push and pull so that every
    ratio compares with scp at the same moment (this VM's speed drifts over minutes).
    """
    import numpy as np
    from IPython import get_ipython

    ip = get_ipython()
    magics = ip.magics_manager.registry["Ec2Magics"]
    r = magics.get_remote()
    out: dict[str, Any] = {}

    def magic(line: str, cell: str) -> None:
        ip.run_cell_magic("ec2", line, cell)

    def api(code: str, **kw: Any) -> Any:
        shown, r.show_progress = r.show_progress, False
        try:
            return r.run(code, **kw)
        finally:
            r.show_progress = shown

    control = f"{r.session}-empty"  # a second session that stays empty: the same moments' baseline

    def scp(way: str) -> float:
        return time_copy(spec["scp"][way], spec["scp"][f"{way}_dest"], spec["size"])

    arr = None
    if spec.get("size"):
        arr = np.empty(spec["size"], dtype=np.uint8)
        with open(spec["src"], "rb", buffering=0) as f:
            f.readinto(memoryview(arr))
    for key, setup in spec["namespaces"]:
        res: dict[str, Any] = {}
        t0 = time.perf_counter()
        if setup:
            magic("run", setup)
        res["setup_s"] = time.perf_counter() - t0
        for _ in range(5):
            magic("run", "pass")
            magic(f"run --session {control}", "pass")
            api("pass")
        cells: list[float] = []
        apis: list[float] = []
        empties: list[float] = []
        for _ in range(spec["runs"]):  # interleaved: the machine's load hits all three alike
            t0 = time.perf_counter()
            magic("run", "pass")
            cells.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            magic(f"run --session {control}", "pass")
            empties.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            api("pass")
            apis.append(time.perf_counter() - t0)
        res["cell_ms"], res["api_ms"], res["empty_ms"] = _median_ms(cells), _median_ms(apis), _median_ms(empties)
        res["cell_p90_ms"] = sorted(cells)[int(len(cells) * 0.9)] * 1000
        if arr is not None and key in spec["transfer"]:
            push_m, push_a, pull_m, pull_a, push_s, pull_s = [], [], [], [], [], []
            for rep in range(-1, spec["reps"]):  # -1: a round untimed (see _in_turn)
                if spec.get("scp") and rep >= 0:
                    push_s.append(scp("upload"))
                for contender, times in _in_turn(rep, ("magics", push_m), ("api", push_a)):
                    arr[:8] = np.frombuffer(os.urandom(8), dtype=np.uint8)  # a new hash: nothing to dedup
                    r.request("evict_objects", limit=0, keep=[])
                    settle()
                    t0 = time.perf_counter()
                    if contender == "magics":
                        ip.user_ns["x"] = arr
                        magic("run -i x", "pass")
                    else:
                        api("pass", push={"x": arr})
                    if rep >= 0:
                        times.append(time.perf_counter() - t0)
            ip.user_ns.pop("x", None)
            previous = None
            for rep in range(-1, spec["reps"]):
                if spec.get("scp") and rep >= 0:
                    pull_s.append(scp("download"))
                for contender, times in _in_turn(rep, ("magics", pull_m), ("api", pull_a)):
                    if previous is not None:  # the previous copy goes, as scp's does
                        try:
                            os.unlink(os.path.join(spec["root"], "jobs", previous, "outputs", "y.obj"))
                        except FileNotFoundError:
                            pass
                    settle()
                    t0 = time.perf_counter()
                    if contender == "magics":
                        magic("run -o y", "y = x")
                        y = ip.user_ns.pop("y")
                        previous = r.last_job.id
                    else:
                        job = api("y = x", pull=["y"])
                        y = job.result()["y"]
                        previous = job.id
                    if rep >= 0:
                        times.append(time.perf_counter() - t0)
                    assert y.nbytes == arr.nbytes and bool(np.array_equal(y[-4096:], arr[-4096:]))
                    # Nothing of this pull outlives it: a value kept (by ``job`` or ``r.last_job``)
                    # was freed inside the other contender's timing, whose allocation then reused
                    # those pages -- on this VM a fresh 512 MiB costs ~1 s, reused pages ~0.1 s.
                    del y
                    job = r.last_job = None
            magic("run", "del x, y")
            res.update(push_magics=push_m, push_api=push_a, pull_magics=pull_m, pull_api=pull_a)
            if spec.get("scp"):
                res.update(push_scp=push_s, pull_scp=pull_s)
        magic("run", "%reset -f")
        out[key] = res
    r.stop_session(control)
    return out


def kernel_drive(kernel_env: dict[str, str], use_line: str, spec: dict[str, Any], repo: str,
                 runs: int) -> dict[str, Any]:
    """The same in a real Jupyter kernel; plus the round trip a Jupyter client sees for a
    ``%%ec2 run pass`` cell and for a plain local ``pass`` cell (the kernel's own cost)."""
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=kernel_env)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        _execute(kc, f"%load_ext remotemagic\n%ec2 {use_line}", 600)
        trips: dict[str, list[float]] = {"magics": [], "local": []}
        for _ in range(5):
            _execute(kc, "%%ec2 run\npass", 60)
        for _ in range(runs):
            for what, code in (("magics", "%%ec2 run\npass"), ("local", "pass")):
                t0 = time.perf_counter()
                _execute(kc, code, 60)
                trips[what].append(time.perf_counter() - t0)
        text = _execute(kc, f"import json, sys\nsys.path.insert(0, {repo!r})\n"
                            "from benchmarks.magics_bench import drive\n"
                            f"print('RESULT ' + json.dumps(drive({spec!r})))", 3600)
        line = [x for x in text.splitlines() if x.startswith("RESULT ")][-1]
        out = json.loads(line[len("RESULT "):])
        out["_round_trip"] = {"magics_ms": _median_ms(trips["magics"]), "local_ms": _median_ms(trips["local"])}
        _execute(kc, "_m = get_ipython().magics_manager.registry['Ec2Magics']\n"
                     "_m.get_remote().stop_session()\n_m.close()", 60)
        return out
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _execute(kc: Any, code: str, timeout: float) -> str:
    """Run a cell; return its stdout; raise with the error if it failed."""
    msg_id = kc.execute(code)
    text: list[str] = []
    error = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except Exception:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream" and content.get("name") == "stdout":
            text.append(content["text"])
        elif kind == "error":
            error = f"{content['ename']}: {content['evalue']}"
        elif kind == "status" and content["execution_state"] == "idle":
            if error:
                raise RuntimeError(f"kernel cell failed: {error}\n{code[:200]}")
            return "".join(text)
    raise RuntimeError(f"kernel cell did not finish in {timeout} s: {code[:200]}")
