#!/bin/sh
# Build-stage installer shared by train.Dockerfile and serve.Dockerfile: the repo's lock
# (requirements/lock/<role>-<pins>.txt, the same file `make setup` installs) -> /opt/lab/venv.
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

# --system-site-packages: a base that ships torch (pytorch/pytorch for cuda) keeps it when it is
# the locked version. Then the same installer as `make setup`: the lock, exactly.
python3 -m venv --system-site-packages /opt/lab/venv
PIP_FIND_LINKS="$src/docker/wheels" sh "$src/requirements/install.sh" /opt/lab/venv/bin/python "$role" "$pins"
find /opt/lab/venv -name __pycache__ -prune -exec rm -rf {} +
