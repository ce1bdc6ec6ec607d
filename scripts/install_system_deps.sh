#!/usr/bin/env bash
# Debian packages the GUI tests need: an X server for napari (xvfb) and the Qt
# xcb platform plugin's libraries. Installed only when missing, only as root;
# otherwise we print what to install and carry on (the non-GUI parts work).
set -euo pipefail

packages=(
  xvfb xauth
  libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-randr0 libxcb-render-util0
  libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libxkbcommon-x11-0
  libgl1 libegl1 libfontconfig1 libdbus-1-3 libglib2.0-0
)

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "install_system_deps: not a Debian-like system; install an X server (Xvfb) and Qt's xcb libraries yourself for the GUI tests."
  exit 0
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install_system_deps: missing Debian packages: ${missing[*]}"
  echo "  run: sudo apt-get update && sudo apt-get install -y ${missing[*]}"
  exit 0
fi

echo "install_system_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
