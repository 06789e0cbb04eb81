#!/usr/bin/env bash
# The TypeScript client (client/): install its npm packages when they are missing or older
# than package-lock.json, and type-check the sources (tsc --noEmit). That the committed
# bundle (gateway/static/client/index.js) was built from these sources is tests/client's
# check. `make demo` needs none of this: the gateway serves the committed bundle.
set -euo pipefail
cd "$(dirname "$0")/../client"
if ! command -v npm >/dev/null; then
  echo "client: npm is missing (apt-get install npm); the client's tests will be skipped"
  exit 0
fi
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "client: installing npm packages (npm ci)..."
  npm ci --no-audit --no-fund --loglevel=error
fi
npm run --silent check
echo "client: TypeScript type check passed"
