#!/usr/bin/env bash
# Debian test tools beyond Python packages: libfaketime runs an edge agent with a wrong
# clock (tests/edge/test_clock_skew.py). Install it when it is missing and we may;
# otherwise say why (that test is then skipped, the injected-clock tests still run).
set -uo pipefail
. "$(dirname "$0")/debian-package.sh"
if compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null; then echo "faketime: present"; exit 0; fi
install_debian_package faketime faketime "the clock-skew test"
