#!/usr/bin/env bash
# The dashboard's browser tests drive Debian's Chromium (test tools cannot download
# browsers here). Install it when it is missing and we may; otherwise say why.
set -uo pipefail
. "$(dirname "$0")/debian-package.sh"
CHROMIUM="${DISPATCH_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then echo "browser: using $CHROMIUM"; exit 0; fi
install_debian_package browser chromium "the dashboard's browser tests"
