"""``python -m remotemagic.envsync pins DIST...``: the ``name==version`` pins of these local
distributions and everything they require (e.g. to fill a wheelhouse with ``pip download``)."""

from __future__ import annotations

import sys

from . import localenv


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "pins":
        print(__doc__, file=sys.stderr)
        return 2
    env = localenv.LocalEnv().refresh()
    names = {localenv.norm(n) for n in argv[1:]}
    unknown = sorted(names - set(env.dists))
    if unknown:
        print(f"not installed here: {', '.join(unknown)}", file=sys.stderr)
        return 1
    for d in env.closure(frozenset(names)):
        print(d.pin)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
