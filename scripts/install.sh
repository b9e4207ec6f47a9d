#!/usr/bin/env bash
# Set up bitfleet on a Debian machine: system packages, a virtual environment in .venv, and
# the package with every extra and the test one. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi

# mosquitto: the MQTT broker the tests start; dataset-fashion-mnist: the default real data.
packages=(python3 python3-venv mosquitto dataset-fashion-mnist)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e '.[all,test]'
echo "bitfleet installed in .venv: $(.venv/bin/bitfleet --version)"
