# Training image, one Dockerfile for every backend: the lab's code and recipes over a venv
# installed from requirements/train-<PINS>.txt (the pins `make setup` uses). compose.yaml
# holds each backend's build args; every base is an argument because registries may be
# unreachable (CI builds on a local debootstrap base).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG PINS=cpu
ARG TORCH_INDEX_URL=""
ARG GPU_ARCH=""
COPY requirements/ /src/requirements/
COPY docker/ /src/docker/
RUN sh /src/docker/install.sh train "${PINS}"

FROM scratch AS app
COPY lab/ /opt/lab/app/lab/
COPY recipes/ /opt/lab/app/recipes/

# Layer order: metadata first, the big venv last (one copy of it; storage drivers such as vfs
# copy the whole image per layer).
FROM ${BASE_IMAGE}
ARG LAB_UID=1000
# A uid the base already has (ubuntu-based images own 1000) is reused; runs/ and the cache
# are mounted, so the run-time user only needs them writable.
RUN (getent passwd "${LAB_UID}" >/dev/null || useradd --uid "${LAB_UID}" --no-create-home --shell /usr/sbin/nologin lab) \
 && mkdir -p /runs /cache && chown "${LAB_UID}" /runs /cache
ENV PATH=/opt/lab/venv/bin:${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin} \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_CERT=/opt/lab/ca-bundle.crt SSL_CERT_FILE=/opt/lab/ca-bundle.crt REQUESTS_CA_BUNDLE=/opt/lab/ca-bundle.crt \
    LAB_RUNS=/runs LAB_CACHE=/cache/lab HF_HOME=/cache/huggingface
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
