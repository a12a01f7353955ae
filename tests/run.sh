#!/usr/bin/env bash
# Install what the test suite needs and run all of it: lint, then every test.
#   bash tests/run.sh            (the README's test command; .ci/run calls exactly this)
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"

# The SSH tests start a real OpenSSH sshd on 127.0.0.1: it must be installed.
if ! [ -x /usr/sbin/sshd ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing openssh-server (needed by the SSH tests)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server) >/dev/null
  else
    echo "The SSH tests need OpenSSH's sshd: install it (e.g. 'sudo apt-get install openssh-server') and run again." >&2
    exit 2
  fi
fi

# The browser tests (tests/test_browser.py) drive Debian's Chromium through Playwright; never
# `playwright install`: the system browser is launched by its path.
if ! [ -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium (needed by the browser tests)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
  else
    echo "The browser tests need Chromium at /usr/bin/chromium: install it (e.g. 'sudo apt-get install chromium') and run again." >&2
    exit 2
  fi
fi

# The bootstrap tests build fresh venvs over SSH; they install from this folder, never from
# the network (tests talk to 127.0.0.1 only), so it is filled here, with the other installs.
WHEELS="${REMOTEMAGIC_TEST_WHEELHOUSE:-.cache/wheelhouse}"
read -r CLOUDPICKLE MIN_IPYTHON < <(python3 -c 'import cloudpickle; from remotemagic.transport.ssh import MIN_IPYTHON; print(cloudpickle.__version__, MIN_IPYTHON)')
python3 -m pip download --quiet --disable-pip-version-check --dest "$WHEELS" \
  "cloudpickle==$CLOUDPICKLE" "ipython>=$MIN_IPYTHON" pip uv

python3 -m ruff check .
python3 -m pytest "$@"
