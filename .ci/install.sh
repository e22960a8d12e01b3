#!/usr/bin/env bash
# Install tools from the system's package manager when they are missing; sourced by
# .ci/run, and run by `make bench` as `bash .ci/install.sh COMMAND:PACKAGE ...`.

install() {  # install APT_NAME [DNF_AND_APK_NAME]
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1"
    elif command -v dnf >/dev/null 2>&1; then
        dnf install -y "${2:-$1}"
    elif command -v apk >/dev/null 2>&1; then
        apk add --no-cache "${2:-$1}"
    else
        echo "$1 is missing and no known package manager was found" >&2
        return 1
    fi
}

need() {  # need COMMAND APT_NAME [DNF_AND_APK_NAME]: install unless COMMAND is found
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || install "$2" "${3:-$2}"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    for pair in "$@"; do
        need "${pair%%:*}" "${pair#*:}"
    done
fi
