#!/usr/bin/env bash
# The alert rules (docs/alerts.yml) are checked with Debian's promtool, from the
# `prometheus` package. Install it when it is missing and we may; otherwise say why.
set -uo pipefail
PROMTOOL="${DISPATCH_PROMTOOL:-$(command -v promtool || echo /usr/bin/promtool)}"
if [ -x "$PROMTOOL" ]; then echo "promtool: using $PROMTOOL"; exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "promtool: installing Debian's prometheus package for the alert rule tests..."
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/tmp/dispatch-promtool.log 2>&1 \
     || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/tmp/dispatch-promtool.log 2>&1; }; then
    echo "promtool: installed $(command -v promtool)"; exit 0
  fi
  echo "promtool: could not install prometheus (see /tmp/dispatch-promtool.log); alert rule tests will be skipped"
else
  echo "promtool: promtool is missing (apt-get install prometheus); alert rule tests will be skipped"
fi
exit 0
