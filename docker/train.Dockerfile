# Training image, one Dockerfile for every backend: the lab's code over a venv
# installed from requirements/train-<PINS>.txt (the pins `make setup` uses). compose.yaml
# holds each backend's build args; every base is an argument because registries may be
# unreachable (CI builds on a local debootstrap base).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# What both the build and the final image need from the system: the run-time user, and the
# libraries the environment loads (rocm: libatomic1 for torch; a C compiler for Triton's
# launchers, hence Liger and flex_attention). The build stage imports the environment with them.
FROM ${BASE_IMAGE} AS base
ARG LAB_UID=1000
ARG APT_PACKAGES=""
# Unpinned apt packages: the base's Debian/Ubuntu release fixes their versions (DL3008);
# APT_PACKAGES is a word list on purpose (SC2086).
# hadolint ignore=DL3008,SC2086
RUN if [ -n "${APT_PACKAGES}" ]; then \
      apt-get update && apt-get install -y --no-install-recommends ${APT_PACKAGES} && rm -rf /var/lib/apt/lists/*; \
    fi \
 && (getent passwd "${LAB_UID}" >/dev/null || useradd --uid "${LAB_UID}" --no-create-home --shell /usr/sbin/nologin lab) \
 && mkdir -p /runs /cache && chown "${LAB_UID}" /runs /cache

FROM base AS build
ARG PINS=cpu
ARG TORCH_INDEX_URL=""
ARG GPU_ARCH=""
COPY requirements/ /src/requirements/
COPY docker/ /src/docker/
# Installs the lock, then imports torch, transformers, trl, peft (and liger where pinned).
RUN sh /src/docker/install.sh train "${PINS}"

FROM scratch AS app
# No recipes or data: compose mounts recipes/ (read-only) and runs/, so an edited recipe never
# needs a rebuild and no user data is baked into a layer.
COPY lab/ /opt/lab/app/lab/

# Layer order: metadata first, the big venv last (one copy of it; storage drivers such as vfs
# copy the whole image per layer).
FROM base
ARG LAB_UID=1000
ARG PINS=cpu
# A uid the base already has (ubuntu-based images own 1000) is reused; runs/ and the cache
# are mounted, so the run-time user only needs them writable.
ENV PATH=/opt/lab/venv/bin:${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin} \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_CERT=/opt/lab/ca-bundle.crt SSL_CERT_FILE=/opt/lab/ca-bundle.crt REQUESTS_CA_BUNDLE=/opt/lab/ca-bundle.crt \
    LAB_RUNS=/runs LAB_CACHE=/cache/lab HF_HOME=/cache/huggingface LAB_PINS=${PINS}
WORKDIR /opt/lab/app
USER ${LAB_UID}
ENTRYPOINT ["python", "-m", "lab"]
CMD ["--help"]
# What the image was built from (`lab images` passes it; run manifests record it). Here, while
# the image is small: metadata steps after the venv would each copy the whole image on vfs, and
# a new commit re-copies the app and venv layers below anyway.
ARG LAB_GIT_COMMIT=""
ARG LAB_GIT_DIRTY=""
ENV LAB_GIT_COMMIT=${LAB_GIT_COMMIT} LAB_GIT_DIRTY=${LAB_GIT_DIRTY}
LABEL org.opencontainers.image.revision=${LAB_GIT_COMMIT}
COPY --from=app /opt/lab/app /opt/lab/app
COPY --from=build /opt/lab /opt/lab
