#!/usr/bin/env bash
# Install what the test suite needs and run all of it: lint, type check, then every test.
#   bash tests/run.sh            (the README's test command; .ci/run calls exactly this)
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"

# need PACKAGE "WHAT NEEDS IT" COMMAND...: unless COMMAND succeeds, install the apt PACKAGE (as
# root), or stop and say what needs it.
need() {
  local package=$1 what=$2
  shift 2
  if "$@" >/dev/null 2>&1; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing $package (needed by $what)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package") >/dev/null
  else
    echo "$package is needed by $what: install it (e.g. 'sudo apt-get install $package') and run again." >&2
    exit 2
  fi
}

# The SSH tests start a real OpenSSH sshd on 127.0.0.1.
need openssh-server "the SSH tests" test -x /usr/sbin/sshd
# The browser tests (tests/test_browser.py) drive Debian's Chromium through Playwright; never
# `playwright install`: the system browser is launched by its path.
need chromium "the browser tests" test -x /usr/bin/chromium
# The EC2 idle-stop script (shipped in the instance's user data) is checked by shellcheck.
need shellcheck "the EC2 user-data test" command -v shellcheck

# The SSH tests build fresh venvs and sync packages into them; the targets (and the client's
# wheel fetches) take wheels from this folder, never from the network (tests talk to 127.0.0.1
# only), so it is filled here, with the other installs: the local versions of what the remote
# venvs need (cloudpickle, IPython, zstandard, numpy, pandas, matplotlib, dask, distributed and their requirements), pip, uv,
# and setuptools + wheel (to build a local package in an isolated build).
WHEELS="${REMOTEMAGIC_TEST_WHEELHOUSE:-.cache/wheelhouse}"
mapfile -t PINS < <(python3 -m remotemagic.envsync pins cloudpickle ipython zstandard numpy pandas matplotlib dask distributed)
[ "${#PINS[@]}" -gt 0 ] || { echo "could not list the local versions of the test packages" >&2; exit 2; }
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --dest "$WHEELS" \
  "${PINS[@]}" pip uv setuptools wheel

python3 -m ruff check .
python3 -m mypy remotemagic
# Two workers, a test file each at a time (its module fixtures are set up once): most tests wait
# on processes they start (kernels, sshd, JupyterLab), so two files at once take ~60 % of the
# time of one after the other, also on a 2-core machine. `-n 0` (given last) runs them in-process.
python3 -m pytest -n 2 --dist loadfile "$@"
