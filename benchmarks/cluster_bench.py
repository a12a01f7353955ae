"""Our Dask cluster (``%ec2 cluster``) against ``distributed.LocalCluster`` on this machine.

    python benchmarks/cluster_bench.py [--workers 2] [--repeat 5] [--no-hosts]

1. The same workloads on our ``--local`` cluster (TLS, nannies as detached agent services) and on
   ``distributed.LocalCluster`` with the same number of worker processes and threads (plain TCP,
   its default): median wall time of each, and their ratio (goal: <= 1.2).
2. Time from ``cluster.start_hosts`` (what ``%ec2 cluster start --hosts`` runs) to the first
   task's result, with two SSH "hosts" (logins on a real sshd on 127.0.0.1): cold (dask and
   distributed are installed into the hosts' venv by package sync) and warm.

Everything runs on 127.0.0.1; every process it starts, it stops.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))


def busy(i: int, seconds: float = 0.02) -> int:
    """CPU work (not sleep): ~``seconds`` of a pure-Python loop."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return i


def inc(i: int) -> int:
    return i + 1


def workloads() -> dict[str, Callable[[Any], Any]]:
    import dask.array as da

    def array_sum(client: Any) -> float:
        x = da.random.RandomState(0).random_sample((6000, 6000), chunks=(750, 750))
        return float(client.compute((x * x).sum()).result())

    def array_matmul(client: Any) -> float:
        x = da.random.RandomState(1).random_sample((3000, 3000), chunks=(750, 750))
        return float(client.compute((x @ x.T).mean()).result())

    def map_cpu(client: Any) -> int:
        return sum(client.gather(client.map(busy, range(200), pure=False)))

    def tiny_tasks(client: Any) -> int:
        return sum(client.gather(client.map(inc, range(2000), pure=False)))

    return {"dask.array sum, 6000x6000 (64 chunks)": array_sum, "dask.array x @ x.T, 3000x3000": array_matmul,
            "client.map 200 x 20 ms CPU": map_cpu, "client.map 2000 tiny tasks": tiny_tasks}


def compare_local(workers: int, repeat: int, tmp: Path) -> list[tuple[str, float, float]]:
    """Both clusters up at once; each workload runs on both in turn (the order alternating), so a
    noisy neighbour slows both alike. Returns (workload, ours, LocalCluster) median seconds."""
    from distributed import Client, LocalCluster

    import remotemagic
    from remotemagic import cluster

    remote = remotemagic.connect("local", root=str(tmp / "target"), state_root=str(tmp / "state"))
    ours = cluster.start_local(workers, remote=remote)
    rows = []
    try:
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as lc:
            with Client(lc, set_as_default=False) as theirs:
                clients = {"ours": ours.connect(), "theirs": theirs}
                for name, fn in workloads().items():
                    times: dict[str, list[float]] = {"ours": [], "theirs": []}
                    for c in clients.values():
                        fn(c)  # warm-up: imports, first connections
                    for r in range(repeat):
                        for side in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
                            t0 = time.perf_counter()
                            fn(clients[side])
                            times[side].append(time.perf_counter() - t0)
                    rows.append((name, statistics.median(times["ours"]), statistics.median(times["theirs"])))
    finally:
        ours.stop()
        remote.stop_session()  # the session worker that ran the get_client() setup job
        remote.close()
    return rows


def hosts_start(tmp: Path) -> list[tuple[str, float]]:
    """Seconds from start_hosts to the first task's result, cold then warm."""
    import remotemagic
    from remotemagic import cluster
    from tests.ssh_fixtures import TEST_PYTHON, WHEELHOUSE, wheelhouse_env
    from tests.sshd import SSHServer, require_sshd

    require_sshd()
    os.environ.setdefault("REMOTEMAGIC_WHEELHOUSE", WHEELHOUSE)
    server = SSHServer(tmp / "sshd", env=wheelhouse_env()).start()
    rows = []
    try:
        cfg = str(server.write_ssh_config(alias="rmbench"))
        opts = {"ssh_config": cfg, "python": TEST_PYTHON, "state_root": str(tmp / "state")}
        roots = [str(tmp / f"host{i}") for i in range(3)]
        t0 = time.perf_counter()
        remotes = [remotemagic.connect("ssh:rmbench", root=r, **opts) for r in roots]
        rows.append(("connect 3 SSH targets (bootstrap: venv, agent)", time.perf_counter() - t0))
        try:
            for label in ("cold: package sync installs dask", "warm"):
                t0 = time.perf_counter()
                c = cluster.start_hosts(remotes[1:], primary=remotes[0])
                try:
                    c.connect().submit(inc, 1).result()
                    rows.append((f"start --hosts (2 hosts) to first task, {label}", time.perf_counter() - t0))
                finally:
                    c.stop()
        finally:
            for r in remotes:
                r.close()
            from tests.workers import stop_workers

            for r in roots:
                stop_workers(r)
    finally:
        server.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="worker processes (1 thread each) on both sides")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per workload (median)")
    ap.add_argument("--no-hosts", action="store_true", help="skip the --hosts start time")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rm-cluster-bench-") as folder:
        tmp = Path(folder)
        os.environ["REMOTEMAGIC_STATE_DIR"] = str(tmp / "state")
        rows = compare_local(args.workers, args.repeat, tmp)
        print(f"\n{args.workers} workers x 1 thread on {os.cpu_count()} CPUs, median of {args.repeat} runs\n")
        w = max(len(r[0]) for r in rows)
        print(f"{'workload'.ljust(w)}  {'ours (TLS)':>11}  {'LocalCluster':>12}  {'ratio':>6}")
        for name, mine, theirs in rows:
            print(f"{name.ljust(w)}  {mine:>10.3f}s  {theirs:>11.3f}s  {mine / theirs:>6.2f}")
        ratios = [m / t for _, m, t in rows]
        mean = statistics.geometric_mean(ratios)
        print(f"{'geometric mean'.ljust(w)}  {'':>11}  {'':>12}  {mean:>6.2f}  (goal <= 1.2)")
        if not args.no_hosts:
            print()
            for name, secs in hosts_start(tmp):
                print(f"{name}: {secs:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
