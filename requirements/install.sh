#!/bin/sh
# Install one pinned environment, exactly, into an existing venv (make setup and the images):
# requirements/torch-<pins>.txt first when there is one (from its own index), then
# requirements/lock/<role>-<pins>.txt with pip --no-deps, so nothing unlocked comes along, and
# --require-hashes: every file pip downloads must have a sha256 the lock lists.
# A copy of the lock stays in the venv: the run manifest compares the venv against it.
# Usage: requirements/install.sh VENV_PYTHON ROLE PINS|""  (env: TORCH_INDEX_URL, GPU_ARCH, LAB_LOCK_SKIP:
# an extended regex of package names the environment already has from elsewhere, left out)
set -eu
py=$1 role=$2 pins=$3
here=$(cd "$(dirname "$0")" && pwd)
lock="$here/lock/$role${pins:+-$pins}.txt"
if [ ! -f "$lock" ]; then
  echo "install.sh: no lock for $role on $pins ($lock); see requirements/locks.yaml and make lock" >&2
  exit 2
fi
# A lock is resolved for one Python (its image's); another one may pick other wheels or none.
want=$(sed -n 's/^# Python \([0-9.]*\),.*/\1/p' "$lock")
have=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ -n "$want" ] && [ "$want" != "$have" ]; then
  echo "install.sh: warning: $(basename "$lock") is resolved for Python $want, this environment has $have" \
       "(make setup PYTHON=python$want installs it exactly)" >&2
fi
if [ -f "$here/torch-$pins.txt" ]; then
  # The ROCm wheels carry the GPU architecture in an extra: gfx1151 unless GPU_ARCH says otherwise.
  torch=$(mktemp)
  sed "s/device-gfx[0-9a-z]*/device-${GPU_ARCH:-gfx1151}/" "$here/torch-$pins.txt" > "$torch"
  set -- ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
  # A lock that holds torch holds its dependencies too: only torch comes from its index. Else
  # (ROCm) torch brings its runtime libraries, and its other dependencies at the lock's versions.
  if grep -q '^torch==' "$lock"; then
    set -- "$@" --no-deps
  else
    # The lock's versions without its hashes: hashes in a constraints file turn on pip's
    # hash-checking mode for the torch file too, which has none.
    sed -e '/^ *--hash=/d' -e 's/ *\\$//' "$lock" > "$torch.lock"
    set -- "$@" -c "$torch.lock"
  fi
  "$py" -m pip install -q "$@" -r "$torch" || { rm -f "$torch" "$torch.lock"; exit 1; }
  rm -f "$torch" "$torch.lock"
fi
# The lock's torch, installed above from its own index, pip keeps as it is (hashes are checked
# only on what pip downloads).
if [ -n "${LAB_LOCK_SKIP:-}" ]; then
  kept=$(mktemp)
  # Whole requirement blocks: the pin and its --hash continuation lines.
  awk -v skip="^(${LAB_LOCK_SKIP})==" '/^[^ ]/ { out = ($0 ~ skip) } !out' "$lock" > "$kept"
  "$py" -m pip install -q --no-deps --require-hashes -r "$kept" || { rm -f "$kept"; exit 1; }
  rm -f "$kept"
else
  "$py" -m pip install -q --no-deps --require-hashes -r "$lock"
fi
cp "$lock" "$("$py" -c 'import sys; print(sys.prefix)')/lab-lock.txt"
