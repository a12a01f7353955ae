"""The tables the magics print: jobs, sessions, stored values, a target's status, our EC2 instances.

Each takes the plain rows :mod:`remotemagic.api` answers with and returns text (or, for the
instances, an object IPython displays as HTML in a notebook and as text in a terminal).
"""

from __future__ import annotations

import html
from typing import Any

from .formatting import clock, duration, size


def jobs_table(rows: list[dict[str, Any]]) -> str:
    """``%ec2 jobs``: one line per job, newest last."""
    width = max(7, *(len(str(j.get("session"))) for j in rows))
    lines = [f"{'job':27} {'session':{width}} {'state':11} {'started':8} {'took':>7}  {'notebook / cell':30} code"]
    for j in rows:
        code = (j.get("code") or f"[{j.get('kind')}]").strip().splitlines()
        origin = j.get("origin") or {}
        where = "/".join(filter(None, (origin.get("notebook"), (origin.get("cell_id") or "")[:8]))) or "-"
        lines.append(f"{j['id']:27} {str(j.get('session')):{width}} {str(j.get('state')):11} "
                     f"{clock(j.get('started')):8} {duration(j.get('started'), j.get('finished')):>7}  "
                     f"{where:30} {(code[0] if code else '')[:40]}")
    return "\n".join(lines)


def sessions_table(rows: list[dict[str, Any]]) -> str:
    """``%ec2 sessions``: worker pid, memory, idle time and what it does, per session."""
    lines = [f"  {'session':20} {'worker':>8} {'memory':>9} {'idle':>7}  state"]
    for s in rows:
        if not s["alive"]:
            lines.append(f"  {s['name']:20} {'-':>8} {'-':>9} {'-':>7}  no worker")
            continue
        idle = duration(s["idle_since"], None) if s.get("idle_since") else "-"
        what = f"running {s['current']}" if s.get("current") else "idle"
        memory = size(s.get("rss")) if s.get("rss") else "?"
        lines.append(f"  {s['name']:20} {s['pid']:>8} {memory:>9} {idle:>7}  {what}")
    return "\n".join(lines)


def status_sessions(rows: list[dict[str, Any]]) -> str:
    """The ``Sessions:`` part of ``%ec2 status``: worker, uptime, running job, checkpoint, spot notice."""
    lines = ["Sessions:"]
    for s in rows:
        what = f"worker pid {s['pid']}, up {duration(s['started'], None)}" if s["alive"] else "no worker"
        busy = f", running {s['current']}" if s.get("current") else ""
        ck = s.get("checkpoint") or {}
        saved = f", checkpoint {clock(ck.get('time'))} ({len(ck.get('names', []))} values)" if ck.get("time") else ""
        lines.append(f"  {s['name']:20} {what}{busy}{saved}")
        notice = s.get("spot_notice") or {}
        if notice and (not s.get("started") or notice.get("received", 0) >= s["started"]):
            ck = notice.get("checkpoint") or {}
            lines.append(f"    spot reclaim notice ({notice.get('action')} at {notice.get('time')}): "
                         + (f"checkpointed {len(ck.get('names', []))} value(s); after the instance is started "
                            "again, %ec2 checkpoint --restore" if ck else "checkpoint not taken yet"))
    return "\n".join(lines)


def stored_values(target: str, values: list[dict[str, Any]]) -> str:
    """``%ec2_store`` without arguments: name, size, type and a preview of each stored value."""
    if not values:
        return f"No values stored on {target}"
    width = max(len(v["name"]) for v in values)
    lines = [f"Stored values on {target}:"]
    lines += [f"{v['name']:{width}} {size(v.get('size')):>9}  {v.get('type', '?'):14} -> {v.get('preview', '')}"
              for v in values]
    return "\n".join(lines)


class InstanceTable:
    """Our EC2 instances with their cost: an HTML table in a notebook, text in a terminal."""

    COLUMNS = ("name", "id", "type", "state", "lifecycle", "uptime", "$/h", "so far", "price from")

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = [self._cells(r) for r in rows]
        self.total = sum(r.get("cost_so_far") or 0.0 for r in rows)

    @staticmethod
    def _cells(r: dict[str, Any]) -> list[str]:
        up = r.get("uptime")
        uptime = "-" if up is None else f"{int(up.total_seconds() // 3600)}h{int(up.total_seconds() % 3600 // 60):02d}m"
        price = r.get("hourly_price")
        cost = r.get("cost_so_far")
        return [str(r.get("name", "?")), str(r.get("id", "?")), str(r.get("type", "?")), str(r.get("state", "?")),
                str(r.get("lifecycle", "?")), uptime, "?" if price is None else f"{price:.4f}",
                "-" if cost is None else f"{cost:.2f}", str(r.get("price_source") or "-")]

    def __repr__(self) -> str:
        if not self.rows:
            return "Instances: none of ours in this region"
        widths = [max(len(c), *(len(row[i]) for row in self.rows)) for i, c in enumerate(self.COLUMNS)]
        lines = ["Instances (tagged as ours, this region):",
                 "  " + "  ".join(c.ljust(w) for c, w in zip(self.COLUMNS, widths, strict=True))]
        lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in self.rows]
        lines.append(f"  compute cost so far: ${self.total:.2f}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self.rows)
        return (f"<table><caption>Instances tagged as ours (compute so far: ${self.total:.2f})</caption>"
                f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
