"""Data path and latency benchmark: remotemagic against OpenSSH, on loopback and a simulated WAN.

    python benchmarks/run.py --quick          # 256 MiB, 2 000 files: a few minutes
    python benchmarks/run.py                  # 1 GiB, 10 000 files (~15 minutes)

One run starts a real sshd on 127.0.0.1 (``tests/sshd.py``) and a WAN relay in front of it
(``benchmarks/wanlink.py``: 40 ms RTT, 200 Mbit/s each way, in its own process), and measures on
both links, with every contender going through the same path:

* OpenSSH: ``scp`` up/down, ``ssh host 'cat > f'`` / ``ssh host cat f``, ``scp -c aes128-gcm``
  (loopback), ``scp -r`` and ``tar | ssh tar`` for a folder of small files, a command on an open
  connection (ControlMaster socket, and paramiko ``exec_command('true')`` with TCP_NODELAY);
* remotemagic: push/pull of a numpy array, push/pull of a file and of the folder, a re-push of
  the unchanged array, the warm ``r.run("pass")`` latency, a compressible array on the WAN;
* peak memory of a process pushing the array and of the remote worker loading it;
* through the magics (``benchmarks/magics_bench.py``): ``%%ec2 run pass``, ``-i`` and ``-o`` on an
  IPython shell and in a real Jupyter kernel, against the API on the same session, with the
  remote namespace empty or holding 300 000 small dicts, a ~150 MiB DataFrame or a big array;
  each push and pull repetition is interleaved with an scp of the same size and with the API's,
  and its ratio is against those (this VM's speed drifts over the minutes a run takes).

It runs from a fresh venv (``python3 -m venv v && v/bin/pip install -e '.[test]'``): the remote
venv is built from the base interpreter and installs cloudpickle, IPython, numpy and pandas
only from the wheelhouse ``tests/run.sh`` uses (``.cache/wheelhouse``; filled here if needed),
once, shared by every remote root of the run.

Ratios are against baselines measured in the same run. The table and
``benchmarks/results/latest.json`` say PASS/MISS for each target. Everything the run starts
(sshd, relay, workers, ControlMaster) it stops; its temporary folder is removed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks import magics_bench  # noqa: E402
from tests.sshd import SSHServer, require_sshd  # noqa: E402

MB = 1e6
MiB = 1024 * 1024
LINK_NAMES = {"lo": "loopback", "wan": "WAN", "env": "machine"}


# -- results -----------------------------------------------------------------------------------
MAGICS_VS_API = "magics >= 0.90x API"  # the target of each transfer row's magics / API ratio
@dataclass
class Row:
    link: str
    what: str
    contender: str
    value: float
    unit: str  # "MB/s", "ms", "MB", "files/s", "%"
    seconds: float | None = None
    baseline: str | None = None
    ratio: float | None = None
    target: str | None = None
    status: str | None = None  # PASS / MISS / None (information only)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Results:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        ratio = f"  x{row.ratio:.2f} of {row.baseline}" if row.ratio is not None else ""
        status = f"  [{row.status}: {row.target}]" if row.status else ""
        print(f"  {LINK_NAMES.get(row.link, row.link):8} {row.what:34} {row.contender:38} "
              f"{fmt(row.value, row.unit):>14}{ratio}{status}", flush=True)
        return row

    def get(self, link: str, what: str, contender: str) -> Row | None:
        for row in self.rows:
            if (row.link, row.what, row.contender) == (link, what, contender):
                return row
        return None


def fmt(value: float, unit: str) -> str:
    if unit in ("MB/s", "files/s"):
        return f"{value:,.1f} {unit}"
    if unit == "ms":
        return f"{value:,.1f} ms"
    if unit == "MB":
        return f"{value:,.0f} MB"
    if unit == "x":
        return f"{value:.3f}"
    return f"{value:g} {unit}"


def print_table(results: Results, header: str) -> None:
    cols = ["link", "what", "contender", "result", "vs. baseline (same run)", "ratio", "target"]
    rows = []
    for r in results.rows:
        rows.append([
            LINK_NAMES.get(r.link, r.link), r.what, r.contender, fmt(r.value, r.unit),
            r.baseline or "", f"{r.ratio:.2f}" if r.ratio is not None else "",
            f"{r.status}: {r.target}" if r.status else "",
        ])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print()
    print(header)
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    notes = [f"- {LINK_NAMES.get(r.link, r.link)} / {r.what} / {r.contender}: {r.note}" for r in results.rows if r.note]
    if notes:
        print("\nNotes:")
        print("\n".join(notes))
    targets = [r for r in results.rows if r.status]
    passed = sum(r.status == "PASS" for r in targets)
    print(f"\nTargets: {passed} PASS, {len(targets) - passed} MISS (of {len(targets)})")


# -- helpers -----------------------------------------------------------------------------------
def run_cmd(cmd: list[str], stdin: Any = None, stdout: Any = subprocess.DEVNULL, timeout: float = 3600) -> float:
    """Run a command, return its wall time; raise with its stderr if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace')[-1000:]}")
    return elapsed


def settle() -> None:
    """Flush dirty pages from the previous step so it does not slow down the next one."""
    os.sync()
    time.sleep(0.2)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def status_of(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def write_random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n


def make_tree(top: Path, count: int, seed: int = 1) -> int:
    """``count`` small files (1 B .. 8 KiB of random bytes) in 100 sub-folders; return total bytes."""
    rnd = random.Random(seed)
    total = 0
    blob = os.urandom(8192 * 64)
    for i in range(count):
        sub = top / f"d{i % 100:02d}"
        if i < 100:
            sub.mkdir(parents=True, exist_ok=True)
        n = rnd.randint(1, 8192)
        start = rnd.randint(0, len(blob) - n)
        (sub / f"f{i:05d}.bin").write_bytes(blob[start:start + n])
        total += n
    return total


def vm_field(pid: int | str, name: str) -> int:
    """A ``VmXXX`` line of /proc/<pid>/status, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(name)


def reset_peak(pid: int | str) -> bool:
    """Reset a process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def stop_workers(root: Path) -> None:
    """Stop every session worker under a remote root (by the pid each recorded)."""
    sessions = root / "sessions"
    if not sessions.is_dir():
        return
    for wj in sessions.glob("*/worker.json"):
        try:
            pid = int(json.loads(wj.read_text())["pid"])
            os.killpg(os.getpgid(pid), signal.SIGTERM)
        except (OSError, ValueError, KeyError, TypeError):
            pass


# -- the setup ---------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.results = Results()
        self.tmp = Path(tempfile.mkdtemp(prefix="rm-bench-", dir=args.tmp))
        self.server: SSHServer | None = None
        self.relay: subprocess.Popen | None = None
        self.relay_port = 0
        self.remote_root = self.tmp / "remote-root"
        self.remote_files = self.tmp / "remote-files"
        self.local_dl = self.tmp / "downloads"
        self.state = self.tmp / "local-state"
        for d in (self.remote_files, self.local_dl, self.state):
            d.mkdir(parents=True)
        self.size = args.size_mb * MiB
        self.src = self.tmp / "random.bin"
        self.comp_src = self.tmp / "arange.bin"
        self.tree = self.tmp / "tree"
        self.cfg = self.tmp / "ssh_config"
        self.meta: dict[str, Any] = {}

    # processes
    def start(self) -> None:
        require_sshd()
        wheels = fill_wheelhouse()
        # the remote venv installs only from the wheelhouse, like the bootstrap tests
        env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "UV_NO_INDEX": "1",
               "UV_FIND_LINKS": str(wheels), "UV_PYTHON_DOWNLOADS": "never"}
        self.server = SSHServer(self.tmp / "sshd", env=env).start()
        if "wan" in self.args.links:
            self.relay = subprocess.Popen(
                [sys.executable, str(HERE / "wanlink.py"), "--target", str(self.server.port),
                 "--delay-ms", str(self.args.rtt_ms / 2), "--rate-mbit", str(self.args.rate_mbit),
                 "--duration", str(self.args.max_minutes * 60)],
                stdout=subprocess.PIPE, text=True)
            assert self.relay.stdout is not None
            line = self.relay.stdout.readline()
            self.relay_port = int(line.split()[0].rsplit(":", 1)[1])
        s = self.server
        common = (f"    User {s.user}\n    IdentityFile {s.client_key}\n    IdentitiesOnly yes\n"
                  f"    UserKnownHostsFile {s.known_hosts}\n    HostKeyAlias {s.host_key_name}\n"
                  "    BatchMode yes\n    ControlMaster no\n    ControlPath none\n")
        text = f"Host bench-lo\n    HostName 127.0.0.1\n    Port {s.port}\n" + common
        if self.relay_port:
            text += f"Host bench-wan\n    HostName 127.0.0.1\n    Port {self.relay_port}\n" + common
        self.cfg.write_text(text)
        os.chmod(self.cfg, 0o600)

    def stop(self) -> None:
        for root in self.remote_root.glob("*"):
            stop_workers(root)
        if self.relay is not None:
            if self.relay.poll() is None:
                self.relay.terminate()
                try:
                    self.relay.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.relay.kill()
                    self.relay.wait()
            if self.relay.stdout:
                self.relay.stdout.close()
            self.relay = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def reps(self, link: str) -> int:
        """Repeats of each bulk transfer (median reported): the WAN ones are long and steady."""
        return self.args.repeat if link == "lo" else self.args.wan_repeat

    def host(self, link: str) -> str:
        return f"bench-{link}"

    def ssh(self, *extra: str) -> list[str]:
        return ["ssh", "-F", str(self.cfg), "-o", "ControlMaster=no", *extra]

    def scp(self, *extra: str) -> list[str]:
        return ["scp", "-q", "-F", str(self.cfg), "-o", "ControlMaster=no", *extra]

    def prepare_data(self) -> None:
        t0 = time.perf_counter()
        write_random_file(self.src, self.size)
        import numpy as np

        np.arange(self.size // 8, dtype=np.float64).tofile(self.comp_src)
        self.tree_bytes = make_tree(self.tree, self.args.files)
        settle()
        print(f"data: {self.size / MiB:.0f} MiB random file, {self.size / MiB:.0f} MiB arange file, "
              f"{self.args.files} files ({self.tree_bytes / MB:.1f} MB) in {time.perf_counter() - t0:.1f} s",
              flush=True)

    # -- OpenSSH ---------------------------------------------------------------------------------
    def openssh(self, link: str) -> None:
        host = self.host(link)
        res = self.results
        size = self.size
        up = self.remote_files / "up.bin"
        down = self.local_dl / "down.bin"

        def transfer(what: str, contender: str, cmd: list[str], dest: Path, stdin: Path | None = None,
                     stdout: Path | None = None, nbytes: int = size) -> Row:
            def once() -> float:
                remove(dest)
                settle()
                fin = open(stdin, "rb") if stdin else None
                fout = open(stdout, "wb") if stdout else subprocess.DEVNULL
                try:
                    t = run_cmd(cmd, stdin=fin, stdout=fout)
                finally:
                    if fin:
                        fin.close()
                    if stdout:
                        fout.close()  # type: ignore[union-attr]
                got = dest.stat().st_size if dest.exists() else -1
                if got != nbytes:
                    raise RuntimeError(f"{contender}: {dest} has {got} bytes, expected {nbytes}")
                remove(dest)
                return t

            times = [once() for _ in range(self.reps(link))]
            t = statistics.median(times)
            note = ""
            if setup is not None and t > setup:
                note = (f"{nbytes / MB / (t - setup):.1f} MB/s if the fresh-connection time ({setup * 1000:.0f} ms, "
                        "ssh host true) is taken out")
            return res.add(Row(link, what, contender, nbytes / MB / t, "MB/s", t, note=note,
                               extra={"times_s": times, "setup_s": setup}))

        setup = min(run_cmd(self.ssh(host, "true")) for _ in range(3))
        t = setup
        res.add(Row(link, "latency: new connection + command", "OpenSSH ssh host true (fresh, best of 3)",
                    t * 1000, "ms", t, note="includes key exchange and the login shell's rc files on this host"))
        transfer("upload file", "OpenSSH scp", self.scp(self.src, f"{host}:{up}"), up)
        transfer("download file", "OpenSSH scp", self.scp(f"{host}:{self.src}", down), down)
        transfer("upload file", "OpenSSH ssh 'cat > f'", self.ssh(host, f"cat > {up}"), up, stdin=self.src)
        transfer("download file", "OpenSSH ssh 'cat f'", self.ssh(host, f"cat {self.src}"), down, stdout=down)
        if link == "lo":
            transfer("upload file", "OpenSSH scp -c aes128-gcm",
                     self.scp("-c", "aes128-gcm@openssh.com", self.src, f"{host}:{up}"), up)
        if link == "wan":
            # the compressible case: OpenSSH's own compression (zlib) as the baseline
            transfer("upload compressible (arange)", "OpenSSH scp -C",
                     self.scp("-C", self.comp_src, f"{host}:{up}"), up)
            transfer("download compressible (arange)", "OpenSSH scp -C",
                     self.scp("-C", f"{host}:{self.comp_src}", down), down)
        self.folders_openssh(link)
        self.latency_openssh(link)

    def folders_openssh(self, link: str) -> None:
        host = self.host(link)
        res = self.results
        n = self.args.files
        subset = self.tree
        count = n
        if link == "wan" and self.args.wan_scp_files < n:
            # scp (SFTP mode) costs ~4 round trips per file: the whole set would take n * ~0.17 s
            count = self.args.wan_scp_files
            subset = self.tmp / "tree-subset"
            subset.mkdir(exist_ok=True)
            picked = sorted(p for p in self.tree.rglob("*.bin"))[:count]
            for p in picked:
                d = subset / p.parent.name
                d.mkdir(exist_ok=True)
                shutil.copy2(p, d / p.name)
        label = "OpenSSH scp -r" + (f" ({count} of the files)" if count != n else "")
        note = (f"scp -r measured on {count} files only: per-file round trips would make {n} take "
                f"~{n / count:.0f}x as long; the ratio compares files per second" if count != n else "")
        dest = self.remote_files / "scp-tree"
        remove(dest)
        settle()
        t = run_cmd(self.scp("-r", subset, f"{host}:{dest}"))
        assert sum(1 for _ in dest.rglob("*.bin")) == count
        remove(dest)
        res.add(Row(link, f"upload folder ({n} files)", label, count / t, "files/s", t, note=note))
        ldest = self.local_dl / "scp-tree"
        remove(ldest)
        settle()
        t = run_cmd(self.scp("-r", f"{host}:{subset}", ldest))
        assert sum(1 for _ in ldest.rglob("*.bin")) == count
        remove(ldest)
        res.add(Row(link, f"download folder ({n} files)", label, count / t, "files/s", t))
        # tar through ssh: one stream, no per-file round trips (what remotemagic does too)
        dest = self.remote_files / "tar-tree"
        settle()
        with subprocess.Popen(["tar", "-C", str(self.tree.parent), "-cf", "-", self.tree.name],
                              stdout=subprocess.PIPE) as tar:
            t = run_cmd(self.ssh(host, f"mkdir -p {dest} && tar -C {dest} -xf -"), stdin=tar.stdout)
        assert sum(1 for _ in dest.rglob("*.bin")) == n
        remove(dest)
        res.add(Row(link, f"upload folder ({n} files)", "OpenSSH tar | ssh tar x", n / t, "files/s", t))
        ldest = self.local_dl / "tar-tree"
        ldest.mkdir()
        settle()
        t0 = time.perf_counter()
        with subprocess.Popen(self.ssh(host, f"tar -C {self.tree.parent} -cf - {self.tree.name}"),
                              stdout=subprocess.PIPE) as sshp:
            subprocess.run(["tar", "-C", str(ldest), "-xf", "-"], stdin=sshp.stdout, check=True)
        t = time.perf_counter() - t0
        assert sum(1 for _ in ldest.rglob("*.bin")) == n
        remove(ldest)
        res.add(Row(link, f"download folder ({n} files)", "OpenSSH ssh tar c | tar x", n / t, "files/s", t))
        if subset != self.tree:
            remove(subset)

    def latency_openssh(self, link: str) -> None:
        host = self.host(link)
        res = self.results
        n = self.args.latency_runs
        sock = self.tmp / f"cm-{link}.sock"
        master = subprocess.Popen(["ssh", "-F", str(self.cfg), "-o", "ControlMaster=yes", "-o", f"ControlPath={sock}",
                                   "-o", "ControlPersist=no", "-N", host], stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not sock.exists():
                if master.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the ControlMaster did not start")
                time.sleep(0.02)
            cmd = ["ssh", "-F", str(self.cfg), "-o", f"ControlPath={sock}", host, "true"]
            for _ in range(3):
                run_cmd(cmd)
            times = [run_cmd(cmd) for _ in range(n)]
            res.add(Row(link, "latency: command on open connection", "OpenSSH ssh -S sock host true (median)",
                        statistics.median(times) * 1000, "ms",
                        extra={"p10_ms": _pct(times, 10), "p90_ms": _pct(times, 90)},
                        note="a new ssh process, a session channel and the login shell (bash rc files) per command"))
        finally:
            subprocess.run(["ssh", "-F", str(self.cfg), "-o", f"ControlPath={sock}", "-O", "exit", host],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                master.wait(timeout=5)
            except subprocess.TimeoutExpired:
                master.terminate()
                master.wait()
        from remotemagic.transport.ssh import open_link, resolve

        lk = open_link(resolve(host, config_path=str(self.cfg)), keepalive=0)
        try:
            t = lk.transport
            assert t.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

            def exec_true() -> float:
                t0 = time.perf_counter()
                ch = t.open_session()
                ch.exec_command("true")
                code = ch.recv_exit_status()
                ch.close()
                assert code == 0
                return time.perf_counter() - t0

            for _ in range(3):
                exec_true()
            times = [exec_true() for _ in range(n)]
            res.add(Row(link, "latency: command on open connection", "paramiko exec_command('true') (median)",
                        statistics.median(times) * 1000, "ms",
                        extra={"p10_ms": _pct(times, 10), "p90_ms": _pct(times, 90)},
                        note="open transport with TCP_NODELAY; each exec starts the login shell"))
            # the floor: one small message echoed on an already-open channel
            ch = t.open_session()
            ch.exec_command("exec cat")
            times = []
            for i in range(n + 3):
                t0 = time.perf_counter()
                ch.sendall(b"x" * 64)
                got = 0
                while got < 64:
                    got += len(ch.recv(64 - got))
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            ch.shutdown_write()
            ch.recv_exit_status()
            ch.close()
            res.add(Row(link, "latency: round trip on open channel", "paramiko 64 B echo via cat (median)",
                        statistics.median(times) * 1000, "ms"))
        finally:
            lk.close()

    # -- remotemagic -------------------------------------------------------------------------------
    def root(self, name: str) -> Path:
        """A remote root of its own (objects are content-addressed: a shared root would make
        the second link's first push a free re-push) whose venv is the run's shared one."""
        root = self.remote_root / name
        if not root.exists():
            root.mkdir(mode=0o700, parents=True)
            (root / "venv").symlink_to(self.shared_venv())
        return root

    def shared_venv(self) -> Path:
        """Bootstrap one remote venv over loopback; add numpy and pandas from the wheelhouse."""
        shared = self.remote_root / "shared"
        if not (shared / "venv").exists():
            import remotemagic

            t0 = time.perf_counter()
            r = remotemagic.connect(f"ssh:{self.host('lo')}", ssh_config=str(self.cfg), root=str(shared),
                                    state_root=str(self.state), session="setup", python=self.args.python)
            try:
                wanted = remote_packages()
                status, _ = r.transport.run(f'"{shared}/venv/bin/python" -c "import numpy, pandas" 2>&1')
                if status != 0:
                    list(r.pip_install(*wanted))
            finally:
                r.close()
            print(f"remote venv: {shared / 'venv'} ({time.perf_counter() - t0:.1f} s)", flush=True)
        return shared / "venv"

    def connect(self, link: str, session: str, compression: str = "auto") -> Any:
        import remotemagic

        return remotemagic.connect(f"ssh:{self.host(link)}", ssh_config=str(self.cfg), root=str(self.root(link)),
                                   state_root=str(self.state), session=session, python=self.args.python,
                                   compression=compression, show_progress=False)

    def remotemagic(self, link: str) -> None:
        import numpy as np

        res = self.results
        size = self.size
        reps = self.reps(link)
        rtt_ms = self.args.rtt_ms if link == "wan" else 0.0
        session = f"bench-{link}-{uuid.uuid4().hex[:6]}"
        t0 = time.perf_counter()
        self.connect(link, session).close()  # a fresh remote root: this one bootstraps it (venv, agent)
        bootstrap_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = self.connect(link, session)
        connect_s = time.perf_counter() - t0
        try:
            conn = r.connection()
            codec = r.codec or "none"
            t0 = time.perf_counter()
            r.run("pass")
            first_cell = time.perf_counter() - t0
            res.add(Row(link, "latency: new connection + command", "remotemagic connect() (bootstrapped root)",
                        connect_s * 1000, "ms", connect_s,
                        note=f"codec chosen by compression=auto: {codec}; the first connect to the fresh root "
                        f"(bootstrap) took {bootstrap_s * 1000:.0f} ms; the first cell (starts the worker) "
                        f"{first_cell * 1000:.0f} ms"))
            # warm cell latency
            for _ in range(5):
                r.run("pass")
            settle()
            times = []
            for _ in range(self.args.latency_runs):
                t0 = time.perf_counter()
                r.run("pass")
                times.append(time.perf_counter() - t0)
            med = statistics.median(times) * 1000
            limit = 30.0 if link == "lo" else 1.5 * rtt_ms + 20
            base = res.get(link, "latency: command on open connection", "OpenSSH ssh -S sock host true (median)")
            res.add(Row(link, "latency: warm cell r.run('pass')", "remotemagic (median)", med, "ms",
                        baseline="ssh -S sock true" if base else None, ratio=med / base.value if base else None,
                        target=f"<= {limit:g} ms" + (" (1.5 RTT + 20)" if link == "wan" else ""),
                        status=status_of(med <= limit),
                        note=f"p10 {_pct(times, 10):.1f} ms, p90 {_pct(times, 90):.1f} ms over {len(times)} runs",
                        extra={"p10_ms": _pct(times, 10), "p90_ms": _pct(times, 90), "runs": len(times)}))
            pings = []
            for _ in range(self.args.latency_runs):
                t0 = time.perf_counter()
                r.request("ping")
                pings.append(time.perf_counter() - t0)
            res.add(Row(link, "latency: round trip on open channel", "remotemagic agent ping (median)",
                        statistics.median(pings) * 1000, "ms"))

            # the array: random bytes (incompressible); every timed push sends a new value
            arr = np.empty(size, dtype=np.uint8)
            with open(self.src, "rb", buffering=0) as f:
                f.readinto(memoryview(arr))
            # Every contender starts a repetition with the previous repetition's copy deleted (scp's
            # destination file; here the previous pushed object, and below the previous -o file):
            # on this VM memory never touched before costs far more than recycled memory (see
            # calibrate), and a cache that keeps old copies would otherwise pay that alone.
            push_times, wires = [], []
            for _ in range(reps):
                arr[:8] = np.frombuffer(os.urandom(8), dtype=np.uint8)  # a new hash: nothing to dedup
                r.request("evict_objects", limit=0, keep=[])
                settle()
                sent0 = conn.bytes_sent
                t0 = time.perf_counter()
                r.run("pass", push={"x": arr})
                push_times.append(time.perf_counter() - t0)
                wires.append(conn.bytes_sent - sent0)
            t_push = statistics.median(push_times)
            wire_push = wires[-1]
            self.vs_scp(link, "upload array / file", "remotemagic push array (r.run push=)", size, push_times, "upload",
                        note=f"{wire_push / MB:.0f} MB on the wire (codec {codec}); includes pickling, hashing, "
                        "fsync on the target and the worker loading it; the previous repetition's object deleted first")
            if link == "lo":  # for the record: the same with the earlier copies left in the cache
                kept = []
                for _ in range(2):
                    arr[:8] = np.frombuffer(os.urandom(8), dtype=np.uint8)
                    settle()
                    t0 = time.perf_counter()
                    r.run("pass", push={"x": arr})
                    kept.append(time.perf_counter() - t0)
                res.add(Row(link, "upload array / file (informational)", "remotemagic push array, earlier copies kept",
                            size / MB / statistics.median(kept), "MB/s", statistics.median(kept),
                            note="each push writes its object into memory this VM has not used recently",
                            extra={"times_s": kept}))
                arr[:8] = np.frombuffer(os.urandom(8), dtype=np.uint8)
                r.request("evict_objects", limit=0, keep=[])
                settle()
                r.run("pass", push={"x": arr})  # the value the re-push and the pulls below use
            settle()
            sent0 = conn.bytes_sent
            t0 = time.perf_counter()
            r.run("pass", push={"x": arr})
            t_re = time.perf_counter() - t0
            wire_re = conn.bytes_sent - sent0
            res.add(Row(link, "re-push unchanged array (dedup)", "remotemagic (time vs first push)", t_re * 1000, "ms",
                        t_re, baseline="first push", ratio=t_re / t_push, target="<= 5 % of first push",
                        status=status_of(t_re <= 0.05 * t_push),
                        note=f"{wire_re} bytes sent on the wire (first push: {wire_push:,})"))
            res.add(Row(link, "re-push unchanged array (dedup)", "remotemagic (bytes vs first push)", wire_re / MB,
                        "MB", baseline="first push", ratio=wire_re / max(1, wire_push), target="<= 5 % of first push",
                        status=status_of(wire_re <= 0.05 * wire_push)))
            pull_times = []
            previous = None
            for _ in range(reps):
                if previous is not None:  # the previous repetition's copy goes, as scp's does
                    remove(self.remote_root / link / "jobs" / previous / "outputs" / "y.obj")
                settle()
                recv0 = conn.bytes_received
                t0 = time.perf_counter()
                job = r.run("y = x", pull=["y"])
                y = job.result()["y"]
                pull_times.append(time.perf_counter() - t0)
                previous = job.id
                wire_pull = conn.bytes_received - recv0
                assert y.nbytes == size and bool(np.array_equal(y[:4096], arr[:4096]))
                assert bool(np.array_equal(y[-4096:], arr[-4096:]))
                del y
            self.vs_scp(link, "download array / file", "remotemagic pull array (.result())", size, pull_times,
                        "download", note=f"{wire_pull / MB:.0f} MB on the wire; includes the worker writing y to disk "
                        "(fsync), streamed while it is written, and unpickling here")
            r.run("del x, y")
            del arr

            # a file
            dest = self.remote_files / "rm-up.bin"
            times = []
            for _ in range(reps):
                remove(dest)
                settle()
                t0 = time.perf_counter()
                ans = r.push(self.src, str(dest))
                times.append(time.perf_counter() - t0)
                assert ans["bytes"] == size and dest.stat().st_size == size
                remove(dest)
            self.vs_scp(link, "upload array / file", "remotemagic r.push(file)", size, times, "upload")
            ldest = self.local_dl / "rm-down.bin"
            times = []
            for _ in range(reps):
                remove(ldest)
                settle()
                t0 = time.perf_counter()
                ans = r.pull(str(self.src), ldest)
                times.append(time.perf_counter() - t0)
                assert ldest.stat().st_size == size
                remove(ldest)
            self.vs_scp(link, "download array / file", "remotemagic r.pull(file)", size, times, "download")

            # the folder
            n = self.args.files
            dest = self.remote_files / "rm-tree"
            settle()
            t0 = time.perf_counter()
            ans = r.push(self.tree, str(dest))
            t = time.perf_counter() - t0
            assert ans["files"] == n, ans
            remove(dest)
            self.vs_folder(link, f"upload folder ({n} files)", "remotemagic r.push(folder)", n, t)
            ldest = self.local_dl / "rm-tree"
            settle()
            t0 = time.perf_counter()
            ans = r.pull(str(self.tree), ldest)
            t = time.perf_counter() - t0
            assert ans["files"] == n, ans
            remove(ldest)
            self.vs_folder(link, f"download folder ({n} files)", "remotemagic r.pull(folder)", n, t)

            if link == "wan":
                self.compressible(r, link)
        finally:
            try:
                r.stop_session()
            finally:
                r.close()

    def compressible(self, r: Any, link: str) -> None:
        import numpy as np

        conn = r.connection()
        z = np.fromfile(self.comp_src, dtype=np.float64)
        settle()
        sent0 = conn.bytes_sent
        t0 = time.perf_counter()
        r.run("pass", push={"z": z})
        t = time.perf_counter() - t0
        wire = conn.bytes_sent - sent0
        self.vs_compressible(link, "upload compressible (arange)", "remotemagic push (compression=auto)", z.nbytes, t,
                             wire, "upload")
        settle()
        recv0 = conn.bytes_received
        t0 = time.perf_counter()
        back = r.run("w = z", pull=["w"]).result()["w"]
        t = time.perf_counter() - t0
        wire = conn.bytes_received - recv0
        assert back.nbytes == z.nbytes and back[-1] == z[-1]
        del back
        self.vs_compressible(link, "download compressible (arange)", "remotemagic pull (compression=auto)", z.nbytes, t,
                             wire, "download")
        r.run("del z, w")

    def vs_scp(self, link: str, what: str, contender: str, nbytes: int, times: list[float], way: str,
               note: str = "") -> None:
        base = self.results.get(link, f"{way} file", "OpenSSH scp")
        t = statistics.median(times)
        rate = nbytes / MB / t
        ratio = rate / base.value if base else None
        if base and base.extra.get("setup_s") and base.seconds:
            net = nbytes / MB / (base.seconds - base.extra["setup_s"])
            note = (note + "; " if note else "") + f"x{rate / net:.2f} of scp with its connection setup taken out"
        self.results.add(Row(link, what, contender, rate, "MB/s", t, baseline=f"scp {way}" if base else None,
                             ratio=ratio, target=">= 0.80 x scp",
                             status=status_of(ratio >= 0.8) if ratio is not None else None,
                             note=note, extra={"times_s": times}))

    def vs_folder(self, link: str, what: str, contender: str, n: int, t: float) -> None:
        base = next((r for r in self.results.rows
                     if r.link == link and r.what == what and r.contender.startswith("OpenSSH scp -r")), None)
        rate = n / t
        ratio = rate / base.value if base else None
        tar = next((r for r in self.results.rows if r.link == link and r.what == what and "tar" in r.contender), None)
        note = f"{rate / tar.value:.2f}x the tar-over-ssh baseline ({tar.value:,.0f} files/s)" if tar else ""
        self.results.add(Row(link, what, contender, rate, "files/s", t, baseline="scp -r" if base else None,
                             ratio=ratio, target=">= 0.80 x scp -r",
                             status=status_of(ratio >= 0.8) if ratio is not None else None, note=note))

    def vs_compressible(self, link: str, what: str, contender: str, nbytes: int, t: float, wire: int, way: str) -> None:
        base = self.results.get(link, what, "OpenSSH scp -C")
        rate = nbytes / MB / t
        ratio = rate / base.value if base else None
        self.results.add(Row(link, what, contender, rate, "MB/s", t, baseline="scp -C" if base else None, ratio=ratio,
                             target=">= 0.80 x scp -C", status=status_of(ratio >= 0.8) if ratio is not None else None,
                             note=f"{nbytes / MB:.0f} MB of array in {wire / MB:.1f} MB on the wire "
                             f"(x{nbytes / max(1, wire):.1f}); effective rate counts the array's bytes"))

    # -- memory ------------------------------------------------------------------------------------
    def memory(self, link: str) -> None:
        """Peak RSS of a fresh process pushing (then pulling) the array, and of its worker."""
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", json.dumps({
            "cfg": str(self.cfg), "host": self.host(link), "root": str(self.root("mem")), "state": str(self.state),
            "src": str(self.src), "size": self.size, "python": self.args.python})]
        settle()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child failed: {proc.stderr[-3000:]}")
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        size_mb = self.size / MB
        res = self.results
        for key, what, contender in (
            ("local_push", "peak RSS while pushing the array", "local process"),
            ("worker_push", "peak RSS while pushing the array", "remote worker (VmHWM)"),
            ("local_pull", "peak RSS while pulling the array", "local process"),
            ("worker_pull", "peak RSS while pulling the array", "remote worker (VmHWM)"),
        ):
            d = m[key]
            extra_mb = (d["peak"] - d["base"]) / MB
            res.add(Row(link, what, contender, d["peak"] / MB, "MB", baseline="array size", ratio=extra_mb / size_mb,
                        note=f"before: {d['base'] / MB:.0f} MB ({d['base_what']}); peak - before = {extra_mb:.0f} MB "
                        f"for a {size_mb:.0f} MB array (ratio column: (peak - before) / array)",
                        extra={k: v for k, v in d.items()}))

    # -- through the magics ------------------------------------------------------------------------
    def magics(self, link: str) -> None:
        """``%%ec2 run`` on an IPython shell and in a Jupyter kernel vs the API and scp."""
        size = self.args.magics_mb * MiB
        src = self.src if size == self.size else self.tmp / "magics.bin"
        if src != self.src:
            write_random_file(src, size)
        up_dest, down_dest = str(self.remote_files / "m-up.bin"), str(self.local_dl / "m-down.bin")
        copies = {"upload": self.scp(str(src), f"{self.host(link)}:{up_dest}"), "upload_dest": up_dest,
                  "download": self.scp(f"{self.host(link)}:{src}", down_dest), "download_dest": down_dest}
        scp = {}
        for way in ("upload", "download"):
            times = [magics_bench.time_copy(copies[way], copies[f"{way}_dest"], size) for _ in range(self.reps(link))]
            scp[way] = size / MB / statistics.median(times)
            self.results.add(Row(link, f"{way} {self.args.magics_mb} MiB file", "OpenSSH scp", scp[way], "MB/s",
                                 statistics.median(times), extra={"times_s": times}))
        array_mb = self.args.size_mb
        namespaces = [[key, code.replace("{array_bytes}", str(array_mb * MiB))]
                      for key, _, code in magics_bench.NAMESPACES]
        shown = f"{array_mb} MiB" if array_mb < 1024 else f"{array_mb / 1024:g} GiB"
        labels = {key: label.replace("{array_label}", shown) for key, label, _ in magics_bench.NAMESPACES}
        root = self.root("magics")
        spec = {"runs": self.args.magics_runs, "reps": self.args.magics_repeat, "size": size, "src": str(src),
                "root": str(root), "namespaces": namespaces, "scp": copies,
                "transfer": ["empty", "dicts"] if self.args.quick else [k for k, _ in namespaces]}
        use = (f"use ssh {self.host(link)} --root {root} --python {self.args.python} --ssh-config {self.cfg} "
               f"--session {{session}}")
        os.environ["REMOTEMAGIC_STATE_DIR"] = str(self.state)
        from IPython.core.interactiveshell import InteractiveShell

        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "remotemagic")
        t0 = time.perf_counter()
        try:
            ip.run_line_magic("ec2", use.format(session=f"shell-{uuid.uuid4().hex[:6]}"))
            got = magics_bench.drive(spec)
            ip.magics_manager.registry["Ec2Magics"].get_remote().stop_session()
        finally:
            ip.run_line_magic("unload_ext", "remotemagic")
        self.magics_rows(link, "IPython shell", got, labels, scp)
        print(f"  (magics on an IPython shell took {time.perf_counter() - t0:.0f} s)", flush=True)
        if self.args.quick:
            spec["transfer"] = ["empty"]
        t0 = time.perf_counter()
        got = magics_bench.kernel_drive(dict(os.environ), use.format(session=f"kernel-{uuid.uuid4().hex[:6]}"),
                                        spec, str(REPO), self.args.magics_runs)
        trip = got.pop("_round_trip")
        self.results.add(Row(link, "kernel round trip: execute -> idle", "Jupyter client, %%ec2 run pass (median)",
                             trip["magics_ms"], "ms", baseline="a local 'pass' cell",
                             ratio=trip["magics_ms"] / trip["local_ms"],
                             note=f"a local 'pass' cell: {trip['local_ms']:.1f} ms "
                             "(the kernel's and the client's own cost)"))
        self.magics_rows(link, "Jupyter kernel", got, labels, scp)
        print(f"  (magics in a Jupyter kernel took {time.perf_counter() - t0:.0f} s)", flush=True)
        self.magics_pooled(link)

    def magics_pooled(self, link: str) -> None:
        """The transfer rows' magics ÷ API ratios together (information: one 512 MiB transfer
        varies by +-20 % between repetitions here, so a single row's median of a few is coarse;
        their geometric mean says whether the magics path as such is slower)."""
        ratios = {verb: [r.ratio for r in self.results.rows if r.link == link and r.target == MAGICS_VS_API
                         and r.what.startswith(verb) and r.ratio] for verb in ("push", "pull")}
        every = ratios["push"] + ratios["pull"]
        if not every:
            return

        def geo(xs: list[float]) -> float:
            return math.exp(statistics.fmean(math.log(x) for x in xs))

        parts = ", ".join(f"{verb}: {geo(xs):.3f} ({min(xs):.2f}-{max(xs):.2f}, {len(xs)} rows)"
                          for verb, xs in ratios.items() if xs)
        self.results.add(Row(link, "push and pull through the magics, every namespace",
                             "magics / API, geometric mean of the rows", geo(every), "x",
                             note=f"{parts}; {self.args.magics_repeat} timed transfers per contender and row",
                             extra=dict(ratios)))

    def magics_rows(self, link: str, where: str, got: dict[str, Any], labels: dict[str, str],
                    scp: dict[str, float]) -> None:
        res = self.results
        mb = self.args.magics_mb
        for key, r in got.items():
            cell, api, empty = r["cell_ms"], r["api_ms"], r["empty_ms"]
            ok = cell <= 10.0 and cell <= 1.2 * empty
            res.add(Row(link, f"warm cell, namespace: {labels[key]}", f"%%ec2 run pass, {where} (median)", cell, "ms",
                        baseline="an empty session, interleaved", ratio=cell / empty,
                        target="<= 10 ms and <= 1.2x empty",
                        status=status_of(ok), note=f"p90 {r['cell_p90_ms']:.1f} ms; an empty session's cell "
                        f"{empty:.1f} ms and API r.run('pass') on this session {api:.1f} ms, interleaved with it; "
                        f"namespace set up in {r['setup_s']:.1f} s",
                        extra={"api_ms": api, "empty_ms": empty, "p90_ms": r["cell_p90_ms"]}))
            res.add(Row(link, f"warm cell, namespace: {labels[key]}", f"magics vs API, {where}", cell / api, "x",
                        baseline="API r.run('pass')", ratio=cell / api, target="<= 1.10x API",
                        status=status_of(cell <= 1.10 * api)))
            for way, magic_key, api_key, verb in (("upload", "push_magics", "push_api", "push"),
                                                  ("download", "pull_magics", "pull_api", "pull")):
                if magic_key not in r:
                    continue
                tm, ta = statistics.median(r[magic_key]), statistics.median(r[api_key])
                rate, api_rate = mb * MiB / MB / tm, mb * MiB / MB / ta
                # scp timed between the same repetitions (the run's first scp figure as a fallback)
                scp_times = r.get(f"{verb}_scp")
                scp_rate = mb * MiB / MB / statistics.median(scp_times) if scp_times else scp[way]
                flag = "-i x" if verb == "push" else "-o y"
                res.add(Row(link, f"{verb} {mb} MiB array, namespace: {labels[key]}", f"%%ec2 run {flag}, {where}",
                            rate, "MB/s", tm, baseline=f"scp {way} {mb} MiB, interleaved", ratio=rate / scp_rate,
                            target=">= 1.0x scp", status=status_of(rate >= scp_rate),
                            note=f"scp {way} interleaved with it: {scp_rate:.1f} MB/s",
                            extra={"times_s": r[magic_key], "scp_times_s": scp_times, "scp_mb_s": scp_rate}))
                res.add(Row(link, f"{verb} {mb} MiB array, namespace: {labels[key]}", f"API r.run({verb}), {where}",
                            api_rate, "MB/s", ta, baseline="magics / API", ratio=rate / api_rate,
                            target=MAGICS_VS_API, status=status_of(rate >= 0.9 * api_rate),
                            note=f"x{api_rate / scp_rate:.2f} of scp", extra={"times_s": r[api_key]}))

    # -- the machine ------------------------------------------------------------------------------
    def calibrate(self, when: str) -> None:
        """How fast this machine gives out fresh memory and page cache: on some VMs the first touch
        of a page costs far more than a copy, and every contender that allocates pays it."""
        import numpy as np

        n = 256 * MiB
        t0 = time.perf_counter()
        a = np.ones(n, dtype=np.uint8)  # fresh anonymous memory, touched once
        t_anon = time.perf_counter() - t0
        t0 = time.perf_counter()
        b = a.copy()
        t_copy2 = time.perf_counter() - t0
        t0 = time.perf_counter()
        b[:] = a
        t_copy = time.perf_counter() - t0
        path = self.tmp / "calibrate.bin"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            f.write(memoryview(a))
        t_cache = time.perf_counter() - t0
        del a, b
        remove(path)
        self.results.add(Row("env", f"fresh memory, first touch ({when})", "numpy.ones 256 MiB", n / MB / t_anon,
                             "MB/s", note=f"copy into fresh memory {n / MB / t_copy2:,.0f} MB/s, into touched memory "
                             f"{n / MB / t_copy:,.0f} MB/s, write to a new file (page cache) "
                             f"{n / MB / t_cache:,.0f} MB/s"))

    # -- the whole run -------------------------------------------------------------------------------
    def run(self) -> None:
        self.start()
        assert self.server is not None
        self.meta = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "size_bytes": self.size, "files": self.args.files,
            "rtt_ms": self.args.rtt_ms, "rate_mbit": self.args.rate_mbit, "python": sys.version.split()[0],
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "openssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip(),
            "quick": self.args.quick,
            "git_head": _git("rev-parse", "--short", "HEAD"),
            "git_dirty": _git("status", "--short", "--untracked-files=no").splitlines(),
            "loadavg_start": list(os.getloadavg()),  # other jobs on the machine: read figures with these
        }
        print(f"sshd on 127.0.0.1:{self.server.port}" + (f", WAN relay on 127.0.0.1:{self.relay_port} "
              f"({self.args.rtt_ms:g} ms RTT, {self.args.rate_mbit:g} Mbit/s)" if self.relay_port else ""), flush=True)
        self.prepare_data()
        self.calibrate("start")
        for link in self.args.links:
            t0 = time.perf_counter()
            print(f"\n== {LINK_NAMES[link]} ==", flush=True)
            if self.args.only_magics:
                self.magics(link)
                continue
            self.openssh(link)
            self.remotemagic(link)
            if link == "lo" and not self.args.skip_memory:
                self.memory(link)
            if link == "lo" and not self.args.skip_magics:
                self.magics(link)
            print(f"  ({LINK_NAMES[link]} took {time.perf_counter() - t0:.0f} s)", flush=True)
        self.calibrate("end")


def base_python() -> str:
    """This interpreter; inside a venv, the one it was made from (a venv made from a venv's
    python gets the base's packages, not the venv's: the bootstrap would find none)."""
    if sys.prefix != sys.base_prefix:
        return getattr(sys, "_base_executable", sys.executable)
    return sys.executable


def remote_packages() -> list[str]:
    """What the remote venv needs beyond the bootstrap: the local numpy and pandas versions."""
    import numpy

    out = [f"numpy=={numpy.__version__}"]
    try:
        import pandas

        out.append(f"pandas=={pandas.__version__}")
    except ImportError:
        pass
    return out


def fill_wheelhouse() -> Path:
    """The wheelhouse tests/run.sh fills, with what the remote venv installs (offline if it
    has everything already)."""
    import cloudpickle

    from remotemagic.transport.ssh import MIN_IPYTHON

    wheels = Path(os.environ.get("REMOTEMAGIC_TEST_WHEELHOUSE") or REPO / ".cache" / "wheelhouse")
    wheels.mkdir(parents=True, exist_ok=True)
    want = [f"cloudpickle=={cloudpickle.__version__}", f"ipython>={MIN_IPYTHON}", "pip", *remote_packages()]
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--dest", str(wheels)]
    offline = subprocess.run([*base, "--no-index", "--find-links", str(wheels), *want], capture_output=True)
    if offline.returncode != 0:
        print(f"filling the wheelhouse {wheels}: {' '.join(want)}", flush=True)
        subprocess.run([*base, *want], check=True)
    return wheels


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _pct(values: list[float], p: int) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p / 100))] * 1000


def memory_child(spec: dict[str, Any]) -> None:
    import numpy as np

    import remotemagic

    pid = os.getpid()
    out: dict[str, Any] = {}
    r = remotemagic.connect(f"ssh:{spec['host']}", ssh_config=spec["cfg"], root=spec["root"], state_root=spec["state"],
                            session=f"mem-{uuid.uuid4().hex[:6]}", python=spec["python"], compression="none",
                            show_progress=False)
    try:
        r.run("pass")
        worker = next(s["pid"] for s in r.sessions() if s["name"] == r.session)
        base_local = vm_field(pid, "VmRSS")
        arr = np.empty(spec["size"], dtype=np.uint8)
        with open(spec["src"], "rb", buffering=0) as f:
            f.readinto(memoryview(arr))
        with_array = vm_field(pid, "VmRSS")
        base_worker = vm_field(worker, "VmRSS")
        reset_peak(pid)
        reset_peak(worker)
        r.run("pass", push={"x": arr})
        out["local_push"] = {"base": with_array, "base_what": "with the array in memory",
                             "peak": vm_field(pid, "VmHWM"), "before_array": base_local,
                             "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        out["worker_push"] = {"base": base_worker, "base_what": "idle worker", "peak": vm_field(worker, "VmHWM"),
                              "after": vm_field(worker, "VmRSS")}
        del arr
        before_pull = vm_field(pid, "VmRSS")
        worker_before = vm_field(worker, "VmRSS")
        reset_peak(pid)
        reset_peak(worker)
        y = r.run("y = x", pull=["y"]).result()["y"]
        assert y.nbytes == spec["size"]
        out["local_pull"] = {"base": before_pull, "base_what": "before the pull, array freed",
                             "peak": vm_field(pid, "VmHWM")}
        out["worker_pull"] = {"base": worker_before, "base_what": "worker holding x", "peak": vm_field(worker, "VmHWM")}
        del y
        r.stop_session()
    finally:
        r.close()
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="256 MiB and 2 000 files: a few minutes")
    p.add_argument("--size-mb", type=int, default=None, help="array/file size in MiB (default 1024; --quick 256)")
    p.add_argument("--files", type=int, default=None, help="small files in the folder (default 10000; --quick 2000)")
    p.add_argument("--links", default="lo,wan", help="comma-separated: lo, wan (default both)")
    p.add_argument("--rtt-ms", type=float, default=40.0)
    p.add_argument("--rate-mbit", type=float, default=200.0)
    p.add_argument("--wan-scp-files", type=int, default=150,
                   help="scp -r on the WAN runs on this many files (it pays ~4 round trips per file)")
    p.add_argument("--latency-runs", type=int, default=50)
    p.add_argument("--repeat", type=int, default=3, help="repeats of each loopback bulk transfer (median)")
    p.add_argument("--wan-repeat", type=int, default=1, help="repeats of each WAN bulk transfer (median)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-magics", action="store_true")
    p.add_argument("--only-magics", action="store_true", help="only the magics rows (and their scp baseline)")
    p.add_argument("--magics-mb", type=int, default=None,
                   help="array pushed and pulled through the magics, in MiB (default 512; --quick 256)")
    p.add_argument("--magics-runs", type=int, default=None,
                   help="warm cells per contender through the magics, interleaved (default 200; --quick 100): "
                   "the magics' own cost is a few %% of a cell, so its ratio to the API needs many cells")
    p.add_argument("--magics-repeat", type=int, default=None,
                   help="timed pushes and pulls per contender through the magics (default 15; --quick 3): "
                   "one 512 MiB transfer varies by +-20 %% between repetitions here, and the magics / API "
                   "line is 10 %% (with 5, one row in eight missed it by noise)")
    p.add_argument("--python", default=base_python(),
                   help="interpreter for the remote venv (default: this one, or the base of the venv it runs in)")
    p.add_argument("--tmp", default=None, help="folder for the temporary files (default: the system's)")
    p.add_argument("--keep-tmp", action="store_true")
    p.add_argument("--max-minutes", type=float, default=60, help="the relay stops by itself after this long")
    p.add_argument("--json", default=str(HERE / "results" / "latest.json"))
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return 0
    args.size_mb = args.size_mb or (256 if args.quick else 1024)
    args.files = args.files or (2000 if args.quick else 10000)
    args.magics_mb = args.magics_mb or (256 if args.quick else 512)
    args.magics_runs = args.magics_runs or (100 if args.quick else 200)
    args.magics_repeat = args.magics_repeat or (3 if args.quick else 15)
    args.links = [x.strip() for x in args.links.split(",") if x.strip()]
    for x in args.links:
        if x not in LINK_NAMES:
            p.error(f"unknown link {x!r}")
    os.environ.pop("SSH_AUTH_SOCK", None)  # only the keys the benchmark names
    bench = Bench(args)
    t0 = time.perf_counter()
    try:
        bench.run()
    finally:
        bench.stop()
    bench.meta["seconds"] = time.perf_counter() - t0
    bench.meta["loadavg_end"] = list(os.getloadavg())
    load = ", ".join(f"{key[8:]} {' '.join(f'{x:.2f}' for x in bench.meta[key])}"
                     for key in ("loadavg_start", "loadavg_end") if key in bench.meta)
    header = (f"remotemagic benchmark -- {args.size_mb} MiB array/file, {args.files} files, WAN = "
              f"{args.rtt_ms:g} ms RTT / {args.rate_mbit:g} Mbit/s; MB = 10^6 bytes; "
              f"medians of {args.repeat} (loopback) / {args.wan_repeat} (WAN) bulk transfers; "
              f"{bench.meta['seconds']:.0f} s; load average (1/5/15 min) {load}; git {bench.meta.get('git_head')}"
              + (" + uncommitted changes" if bench.meta.get("git_dirty") else ""))
    print_table(bench.results, header)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": bench.meta, "rows": [asdict(r) for r in bench.results.rows]}, indent=1))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
