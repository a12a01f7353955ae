"""The remote half of remotemagic.

This package is shipped *as source* to every target (``<root>/agent/<version>/remotemagic_agent``)
and runs there with nothing but the standard library, cloudpickle and IPython. It must never
import the local ``remotemagic`` package: relative imports only.

Modules:
    wire     -- frame format on the agent's stdin/stdout (shared with the local side)
    files    -- atomic writes, the on-disk layout, object (pickle) files
    worker   -- the per-session detached process that runs cells in a headless IPython shell
    server   -- the agent: serves requests from the local side over one byte stream
"""

PROTOCOL = 1
