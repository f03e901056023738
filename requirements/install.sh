#!/bin/sh
# Install one pinned environment, exactly, into an existing venv (make setup and the images):
# requirements/torch-<pins>.txt first when there is one (from its own index), then
# requirements/lock/<role>-<pins>.txt with pip --no-deps, so nothing unlocked comes along.
# A copy of the lock stays in the venv: the run manifest compares the venv against it.
# Usage: requirements/install.sh VENV_PYTHON ROLE PINS|""  (env: TORCH_INDEX_URL, GPU_ARCH)
set -eu
py=$1 role=$2 pins=$3
here=$(cd "$(dirname "$0")" && pwd)
lock="$here/lock/$role${pins:+-$pins}.txt"
if [ ! -f "$lock" ]; then
  echo "install.sh: no lock for $role on $pins ($lock); see requirements/locks.yaml and make lock" >&2
  exit 2
fi
if [ -f "$here/torch-$pins.txt" ]; then
  # The ROCm wheels carry the GPU architecture in an extra: gfx1151 unless GPU_ARCH says otherwise.
  torch=$(mktemp)
  sed "s/device-gfx[0-9a-z]*/device-${GPU_ARCH:-gfx1151}/" "$here/torch-$pins.txt" > "$torch"
  set -- ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
  # A lock that holds torch holds its dependencies too: only torch comes from its index. Else
  # (ROCm) torch brings its runtime libraries, and its other dependencies at the lock's versions.
  if grep -q '^torch==' "$lock"; then set -- "$@" --no-deps; else set -- "$@" -c "$lock"; fi
  "$py" -m pip install -q "$@" -r "$torch" || { rm -f "$torch"; exit 1; }
  rm -f "$torch"
fi
"$py" -m pip install -q --no-deps -r "$lock"
cp "$lock" "$("$py" -c 'import sys; print(sys.prefix)')/lab-lock.txt"
