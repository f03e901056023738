#!/bin/sh
# vLLM's OpenAI-compatible server with the image's serve/<hw>.yaml flags (LAB_SERVE_CONFIG),
# rendering prompts with the chat-template kwargs the recipe trained with
# (LAB_CHAT_TEMPLATE_KWARGS, JSON; see pitfall 1). The rest comes from the command
# (compose.yaml's serve services, or `docker run ... IMAGE --model DIR ...`).
set -eu
kwargs=${LAB_CHAT_TEMPLATE_KWARGS:-}
if [ -z "$kwargs" ]; then kwargs='{"enable_thinking": false}'; fi
exec python -m vllm.entrypoints.openai.api_server --config "$LAB_SERVE_CONFIG" \
  --default-chat-template-kwargs "$kwargs" "$@"
