#!/usr/bin/env bash
# An arm64 runtime in .arm64/ that runs under user-mode emulation (docs/export.md#runtimes):
# Debian's arm64 python3 and the shared libraries it and onnxruntime load, unpacked into a
# sysroot (never installed over the host's packages), and onnxruntime's and numpy's aarch64
# wheels unpacked into a site-packages folder beside it. qemu-user-static comes from the host's
# own Debian packages. `export/emulation.py` runs `export/ort_runner.py` with it, as a Pi 4
# (-cpu cortex-a72, no dot products) or a Pi 5 (-cpu cortex-a76, asimddp).
#
# Safe to run again: downloads are cached in .arm64/cache, and the sysroot is rebuilt only
# when what it should hold changed. Versions: ARM64_ORT (default 1.22.1: 1.32's aarch64 wheel
# crashes at import under Debian 12's qemu 7.2), ARM64_NUMPY (default 2.4.6).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
dest="$repo/.arm64"
ort_version="${ARM64_ORT:-1.22.1}"
numpy_version="${ARM64_NUMPY:-2.4.6}"
pip=(.venv/bin/python -m pip)
[ -x .venv/bin/python ] || pip=(python3 -m pip)

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
if ! command -v qemu-aarch64-static >/dev/null; then
  echo "installing Debian package: qemu-user-static"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq qemu-user-static >/dev/null
fi

# A private apt for arm64: its own lists and cache under .arm64/cache/apt, the host's Debian
# sources, an empty dpkg status. `dpkg --add-architecture` is not needed and the host's apt
# state is left as it is.
apt_dir="$dest/cache/apt"
mkdir -p "$dest"
# Ignored by git (and so by ruff) from within, as `python -m venv` does for its folder.
[ -f "$dest/.gitignore" ] || echo '*' >"$dest/.gitignore"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$dest/cache/debs" \
  "$dest/cache/wheels"
touch "$apt_dir/status"
apt_opts=(
  -o "Dir::State=$apt_dir" -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::State::status=$apt_dir/status" -o "Dir::Cache=$apt_dir"
  -o "APT::Architecture=arm64" -o "APT::Architectures::=arm64"
  -o "APT::Sandbox::User=root"
)
# Refresh the lists once a day at most (and whenever none are there yet).
if [ -z "$(find "$apt_dir/lists" -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit)" ]; then
  apt-get "${apt_opts[@]}" update -qq
fi

# The interpreter Debian ships as python3, e.g. python3.11 in Debian 12.
py=$(apt-cache "${apt_opts[@]}" depends python3-minimal | grep -o 'python3\.[0-9]*-minimal' \
  | head -1 | sed 's/-minimal$//')
[ -n "$py" ] || { echo "no python3 in Debian's arm64 lists" >&2; exit 1; }
abi="cp${py#python}"; abi="${abi/./}"
# What the interpreter, its stdlib's extension modules and onnxruntime/numpy load: libc,
# libcrypt (the interpreter), zlib/expat/libffi/libssl/bz2/lzma/uuid (stdlib modules),
# libstdc++/libgcc_s (onnxruntime), libgomp (not needed by these wheels today; cheap).
debs=(
  "$py-minimal" "lib$py-minimal" "lib$py-stdlib" libc6 libcrypt1 zlib1g libexpat1 libffi8
  libssl3 libbz2-1.0 liblzma5 libuuid1 libstdc++6 libgcc-s1 libgomp1
)
# One `apt-cache policy` for all (each call reads the lists anew): "name=candidate" lines.
mapfile -t resolved < <(apt-cache "${apt_opts[@]}" policy "${debs[@]}" | awk '
  /^[^ ].*:$/ { name = substr($1, 1, length($1) - 1); sub(/:arm64$/, "", name) }
  /^  Candidate: / && $2 != "(none)" { print name "=" $2 }')
if [ ${#resolved[@]} -ne ${#debs[@]} ]; then
  echo "not all of ${debs[*]} are in Debian's arm64 lists: ${resolved[*]}" >&2
  exit 1
fi
(
  cd "$dest/cache/debs"
  want=()
  for pv in "${resolved[@]}"; do
    p=${pv%%=*} v=${pv#*=}
    [ -f "${p}_${v/:/%3a}_arm64.deb" ] || want+=("$p:arm64=$v")
  done
  if [ ${#want[@]} -gt 0 ]; then apt-get "${apt_opts[@]}" download -qq "${want[@]}"; fi
)

for spec in "onnxruntime==$ort_version" "numpy==$numpy_version"; do
  name=${spec%%==*} version=${spec#*==}
  if ! ls "$dest/cache/wheels/${name}-${version}-${abi}-"*aarch64*.whl >/dev/null 2>&1; then
    "${pip[@]}" download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
      --platform manylinux2014_aarch64 --python-version "${py#python}" --implementation cp \
      --abi "$abi" "$spec" -d "$dest/cache/wheels"
  fi
done

# Unpack only when the package set changed: a stamp names every deb and wheel unpacked.
stamp="$(printf '%s\n' "${resolved[@]}" "onnxruntime==$ort_version" "numpy==$numpy_version")"
if [ ! -f "$dest/runtime.json" ] || [ "$(cat "$dest/stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$dest/sysroot.new" "$dest/site-packages.new"
  mkdir -p "$dest/sysroot.new" "$dest/site-packages.new"
  for pv in "${resolved[@]}"; do
    p=${pv%%=*} v=${pv#*=}
    dpkg -x "$dest/cache/debs/${p}_${v/:/%3a}_arm64.deb" "$dest/sysroot.new"
  done
  # Empty on purpose: the interpreter's default dist-packages paths exist in the sysroot, so
  # qemu's -L never falls through to the host's x86 packages there.
  mkdir -p "$dest/sysroot.new/usr/lib/python3/dist-packages" \
    "$dest/sysroot.new/usr/local/lib/${py}/dist-packages"
  for spec in "onnxruntime-$ort_version" "numpy-$numpy_version"; do
    whl=$(ls "$dest/cache/wheels/${spec}-${abi}-"*aarch64*.whl | head -1)
    python3 -m zipfile -e "$whl" "$dest/site-packages.new"
  done
  rm -rf "$dest/sysroot" "$dest/site-packages" "$dest/runtime.json"
  mv "$dest/sysroot.new" "$dest/sysroot"
  mv "$dest/site-packages.new" "$dest/site-packages"
  printf '%s\n' "$stamp" >"$dest/stamp"
  python_version=$(printf '%s\n' "${resolved[@]}" | sed -n "s/^$py-minimal=//p")
  qemu_version=$(qemu-aarch64-static --version | head -1)
  cat >"$dest/runtime.json" <<EOF
{
  "python": "/usr/bin/$py",
  "site_packages": "site-packages",
  "debian_python": "$python_version",
  "onnxruntime": "$ort_version",
  "numpy": "$numpy_version",
  "qemu": "$qemu_version"
}
EOF
fi

# Check it runs, and say what it is.
cpu_check=$(PYTHONHOME=/usr PYTHONPATH="$dest/site-packages" PYTHONNOUSERSITE=1 \
  qemu-aarch64-static -cpu cortex-a72 -L "$dest/sysroot" "$dest/sysroot/usr/bin/$py" -c \
  'import platform, numpy, onnxruntime
print(platform.machine(), platform.python_version(), "numpy", numpy.__version__,
      "onnxruntime", onnxruntime.__version__)')
echo "arm64 runtime in .arm64: $cpu_check ($(qemu-aarch64-static --version | head -1))"
