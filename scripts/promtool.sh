#!/usr/bin/env bash
# The alert rules (docs/alerts.yml) are checked with Debian's promtool, from the
# `prometheus` package. Install it when it is missing and we may; otherwise say why.
set -uo pipefail
. "$(dirname "$0")/debian-package.sh"
PROMTOOL="${DISPATCH_PROMTOOL:-$(command -v promtool || echo /usr/bin/promtool)}"
if [ -x "$PROMTOOL" ]; then echo "promtool: using $PROMTOOL"; exit 0; fi
install_debian_package promtool prometheus "the alert rule tests" --no-install-recommends
