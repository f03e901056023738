"""vLLM's API key on every path but the health checks (vLLM loads it: --middleware keyguard.KeyEverywhere).

vLLM's own check (its AuthenticationMiddleware) guards only paths under /v1, /v2, /inference and
/cohere. Everything else answers whoever reaches the port: /tokenize and /detokenize, /metrics,
SageMaker's /invocations (a chat endpoint) and, once runtime LoRA updating is on, SageMaker's
`POST /adapters`, which loads an adapter from any path the server can read. The lab gives every
server a key so that no other user of a shared host can use it; this applies that same key, the
same way (a Bearer token compared by its SHA-256 digest), to those paths too. No key: no check.
It imports nothing from the lab: it runs inside vLLM's environment (venv or image).
"""

import hashlib
import json
import os
import secrets

OPEN = ("/health", "/ping")  # liveness only: the lab's and Docker's health checks, SageMaker's


class KeyEverywhere:
    def __init__(self, app):
        self.app = app
        key = os.environ.get("VLLM_API_KEY")
        self.digest = hashlib.sha256(key.encode()).digest() if key else None

    def allowed(self, scope) -> bool:
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and secrets.compare_digest(
                    hashlib.sha256(token.encode()).digest(), self.digest)
        return False

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if (self.digest is None or scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS"
                or path in OPEN or self.allowed(scope)):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps({"error": "Unauthorized"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
