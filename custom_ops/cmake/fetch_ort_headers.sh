#!/usr/bin/env bash
# Downloads Debian trixie's libonnxruntime-dev (headers only, ~85 KB) with a private apt
# configuration (the system's sources and state are untouched) and unpacks it into $1.
# Prints the include directory on stdout.
set -euo pipefail
dest="$1"
work="$dest/apt"
mkdir -p "$work/sources" "$work/lists/partial" "$work/deb"
cat > "$work/sources/trixie.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
opts=(-o "Dir::Etc::SourceParts=$work/sources" -o "Dir::Etc::SourceList=/dev/null"
      -o "Dir::State::Lists=$work/lists" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${opts[@]}" update >&2
(cd "$work/deb" && apt-get "${opts[@]}" download libonnxruntime-dev >&2)
dpkg -x "$work"/deb/libonnxruntime-dev_*.deb "$dest/root"
inc="$dest/root/usr/include/onnxruntime"
test -f "$inc/onnxruntime_cxx_api.h"
echo "$inc"
