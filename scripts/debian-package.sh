#!/usr/bin/env bash
# Sourced by the scripts that fetch a Debian test tool: installs the package when we are
# root and have apt-get (with a fresh package list if the first try fails, as a new
# container has none), otherwise says which tests will be skipped. Never fails the run.
#
#   install_debian_package TAG PACKAGE TESTS [APT-GET OPTION...]
#     TAG starts every line; TESTS names what runs only with the package installed.
install_debian_package() {
  local tag="$1" package="$2" tests="$3" log="/tmp/dispatch-$2.log"
  shift 3
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "$tag: $package is missing (apt-get install $package); $tests will be skipped"
    return 0
  fi
  echo "$tag: installing Debian's $package for $tests..."
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" "$package" >"$log" 2>&1 \
     || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" "$package" >"$log" 2>&1; }; then
    echo "$tag: installed $package"
  else
    echo "$tag: could not install $package (see $log); $tests will be skipped"
  fi
}
