#!/usr/bin/env bash
# The dashboard's browser tests drive Debian's Chromium (test tools cannot download
# browsers here). Install it when it is missing and we may; otherwise say why.
set -uo pipefail
CHROMIUM="${DISPATCH_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then echo "browser: using $CHROMIUM"; exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "browser: installing Debian's chromium for the dashboard tests..."
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/tmp/dispatch-chromium.log 2>&1 \
     || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/tmp/dispatch-chromium.log 2>&1; }; then
    echo "browser: installed $CHROMIUM"; exit 0
  fi
  echo "browser: could not install chromium (see /tmp/dispatch-chromium.log); browser tests will be skipped"
else
  echo "browser: $CHROMIUM is missing (apt-get install chromium); browser tests will be skipped"
fi
exit 0
