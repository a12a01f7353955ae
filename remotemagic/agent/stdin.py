"""stdin of a running cell, forwarded to the notebook: ``input()``, ``getpass()`` and debugger
prompts (``pdb``, ``%debug``) ask the user through the client.

The worker creates the FIFO ``stdin/<seq>.fifo`` (0600), appends an ``input_request`` event
(prompt, password flag, sequence number) to the job's log and waits on the FIFO; the client that
follows the job asks its user (Jupyter's input_request) and sends the answer with the agent's
``stdin`` request, which writes it into the FIFO: an answer (a password too) never touches the
disk. The worker returns the text, or raises the error the client met
(``StdinNotImplementedError`` when the frontend cannot answer, as a local kernel would). A job
nobody can answer (``--bg``) fails at once instead of waiting.
"""

from __future__ import annotations

import builtins
import getpass
import json
import os
import select
from typing import Any, Callable

from . import files

POLL = 0.5  # select() wakes at once on an answer; this only bounds a wait
NO_FRONTEND = ("input was called, but nobody can answer it: the job was started without stdin "
               "(a --bg job, or Remote.run without stdin=True); run the cell in the foreground")


def _error(ename: str, evalue: str) -> BaseException:
    if ename == "StdinNotImplementedError":
        from IPython.core.error import StdinNotImplementedError

        return StdinNotImplementedError(evalue)
    cls = getattr(builtins, ename, None)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        return cls(evalue)
    return EOFError(f"{ename}: {evalue}" if evalue else ename)


class Forwarder:
    """``builtins.input`` and ``getpass.getpass`` of one cell."""

    def __init__(self, emit: Callable[[dict[str, Any]], None], jdir: str, job_id: str, allowed: bool):
        self.emit = emit
        self.dir = os.path.join(jdir, "stdin")
        self.job_id = job_id
        self.allowed = allowed
        self.seq = 0

    def install(self) -> Callable[[], None]:
        saved = builtins.input, getpass.getpass
        builtins.input = self.input
        getpass.getpass = self.getpass

        def restore() -> None:
            builtins.input, getpass.getpass = saved

        return restore

    def input(self, prompt: Any = "") -> str:
        return self.ask(str(prompt), password=False)

    def getpass(self, prompt: str = "Password: ", stream: Any = None) -> str:
        return self.ask(str(prompt), password=True)

    def ask(self, prompt: str, password: bool) -> str:
        if not self.allowed:
            from IPython.core.error import StdinNotImplementedError

            raise StdinNotImplementedError(NO_FRONTEND)
        self.seq += 1
        seq = self.seq
        files.private_dir(self.dir)
        fifo = os.path.join(self.dir, f"{seq}.fifo")
        os.mkfifo(fifo, 0o600)
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a writer of our own: never EOF while waiting
        try:
            self.emit({"type": "input_request", "job": self.job_id, "seq": seq, "prompt": prompt, "password": password})
            buf = b""
            while not buf.endswith(b"\n"):  # a Ctrl-C (cancel) raises KeyboardInterrupt here
                if select.select([fd], [], [], POLL)[0]:
                    try:
                        buf += os.read(fd, 65536)
                    except BlockingIOError:
                        pass
            reply = json.loads(buf)
        finally:
            os.close(fd)
            try:
                os.unlink(fifo)
            except FileNotFoundError:
                pass
        if reply.get("error"):
            err = reply["error"]
            raise _error(str(err.get("ename", "EOFError")), str(err.get("evalue", "")))
        return str(reply.get("value", ""))
