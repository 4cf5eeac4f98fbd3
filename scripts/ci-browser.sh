#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver for tests/test_web.py (headless browser test) when
# they are missing. Idempotent and quiet: nothing happens when both are already on PATH. Called from
# .ci/run before the tests; exits non-zero when it cannot install them, so CI never skips silently.
#
#     scripts/ci-browser.sh
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
if have chromium && have chromedriver; then
  exit 0
fi
if ! have apt-get; then
  echo "ci-browser: chromium/chromedriver missing and no apt-get here; install them by hand" >&2
  exit 1
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if have sudo && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "ci-browser: chromium/chromedriver missing and no root (or password-less sudo) to install them" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq >/dev/null
"${SUDO[@]}" apt-get install -y -qq chromium chromium-driver >/dev/null
if ! (have chromium && have chromedriver); then
  echo "ci-browser: apt-get finished but chromium or chromedriver is still not on PATH" >&2
  exit 1
fi
echo "ci-browser: installed $(chromedriver --version | head -n 1)"
