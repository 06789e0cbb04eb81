#!/usr/bin/env bash
# Debian test tools beyond Python packages: libfaketime runs an edge agent with a wrong
# clock (tests/edge/test_clock_skew.py). Install it when it is missing and we may;
# otherwise say why (that test is then skipped, the injected-clock tests still run).
set -uo pipefail
if compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null; then echo "faketime: present"; exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "faketime: installing Debian's faketime for the clock-skew test..."
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -q faketime >/tmp/dispatch-faketime.log 2>&1 \
     || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q faketime >/tmp/dispatch-faketime.log 2>&1; }; then
    echo "faketime: installed"; exit 0
  fi
  echo "faketime: could not install it (see /tmp/dispatch-faketime.log); its test will be skipped"
else
  echo "faketime: missing (apt-get install faketime); its test will be skipped"
fi
exit 0
