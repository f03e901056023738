# Ray's worker image (lab-ray:<hw>): the lab's training image of that hardware plus Ray Train,
# installed from requirements/lock/ray-<PINS>.txt, which keeps every version of the training lock
# (locks.yaml: over). Every node of a Ray cluster runs `ray start` in it, and `make train
# CLUSTER=... RUNTIME=docker` runs the driver in it: the workers then import the same lab, at the
# same path (/opt/lab/app), with the same pins, and see runs/ and the caches where the lab mounts them.
# Built after the training image it extends (`lab images` builds it in that order).
ARG TRAIN_IMAGE=lab-train:cpu
FROM ${TRAIN_IMAGE}
ARG LAB_UID=1000
ARG PINS=cpu
ARG TORCH_INDEX_URL=""
USER 0
COPY requirements/ /src/requirements/
COPY docker/ /src/docker/
# Adds Ray's packages to the image's venv (nothing the training lock pins moves), then imports
# ray.train beside torch, transformers, trl and peft.
RUN sh /src/docker/install.sh ray "${PINS}" && rm -rf /src
USER ${LAB_UID}
ARG LAB_GIT_COMMIT=""
ARG LAB_GIT_DIRTY=""
ENV LAB_GIT_COMMIT=${LAB_GIT_COMMIT} LAB_GIT_DIRTY=${LAB_GIT_DIRTY}
LABEL org.opencontainers.image.revision=${LAB_GIT_COMMIT}
