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

# The oldest onnxruntime pyproject.toml admits, beside the newest in .venv: boards run what
# their image ships, so exported files are checked in both (docs/export.md#runtimes).
ort_min=$(sed -n 's/^ *"onnxruntime>=\([0-9.]*\)".*/\1/p' pyproject.toml)
if [ ! -x .venv-ort-oldest/bin/python ]; then
  python3 -m venv .venv-ort-oldest
fi
.venv-ort-oldest/bin/python -m pip install --quiet "onnxruntime~=${ort_min}.0" numpy
echo "oldest admitted onnxruntime in .venv-ort-oldest: $(.venv-ort-oldest/bin/python -c \
  'import onnxruntime; print(onnxruntime.__version__)')"

# onnxruntime's aarch64 build under qemu-user, as a Pi 4 and a Pi 5 (docs/export.md#runtimes).
scripts/arm64_runtime.sh
