"""The remote half of remotemagic.

This package is shipped *as source* to every target (``<root>/agent/<version>/remotemagic_agent``)
and runs there with nothing but the standard library, cloudpickle and IPython. It must never
import the local ``remotemagic`` package: relative imports only.

Modules (every one a flat ``*.py`` here: the transport ships ``agent/*.py``):
    protocol     -- op names, job states, name rules, the shapes of specs/statuses/events (both sides)
    wire         -- frame format on the agent's stdin/stdout (shared with the local side)
    files        -- atomic writes, the on-disk layout, object (pickle) files, locks
    transfer     -- tar streams and safe extraction (shared with the local side)
    server       -- the agent: one connection, frames in, requests dispatched to ops_* handlers
    ops_jobs, ops_sessions, ops_store, ops_files, uploads -- the handlers, by area
    worker       -- the per-session detached process that runs cells in a headless IPython shell
    supervisor   -- the worker's parent: fails its jobs if it dies
    events       -- a job's event log (events.jsonl) and the batched stdout/stderr streams
    cellshell, stdin, fdcapture, checkpoint, recover, spot -- the worker's parts
"""

from .protocol import PROTOCOL as PROTOCOL
