"""Load: a bounded burst of concurrent chat requests against a served model, as a benchmark.

`make load` keeps CONCURRENCY requests in flight (32 by default) until REQUESTS (256) have been
sent or TIME_LIMIT seconds (300) have passed, alternating streamed and plain completions, and
reports errors, latency percentiles (p50/p99; time to first token for streamed ones) and generated
tokens per second. It measures; it asserts nothing about speed. The requests go through httpx's
async client (the OpenAI SDK's own transport) so that one process holds the whole burst.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from lab.errors import LabError
from lab.recipe import Recipe


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 3)


async def _one(client, url: str, body: dict, stream: bool) -> dict[str, Any]:
    started = time.perf_counter()
    first = None
    tokens = 0
    if stream:
        payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", url, json=payload) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}", "stream": True}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content") and first is None:
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens", 0)
    else:
        r = await client.post(url, json=body)
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}", "stream": False}
        tokens = (r.json().get("usage") or {}).get("completion_tokens", 0)
    return {"latency_s": time.perf_counter() - started, "ttft_s": first, "tokens": tokens, "stream": stream}


async def _burst(url: str, model: str, questions: list[str], recipe: Recipe, headers: dict, concurrency: int,
                 total: int, time_limit_s: float) -> tuple[list[dict], float]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    deadline = time.monotonic() + time_limit_s
    results: list[dict] = []
    next_index = 0

    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=recipe.probe.timeout_s) as client:
        async def worker():
            nonlocal next_index
            while next_index < total and time.monotonic() < deadline:
                i = next_index
                next_index += 1
                body = {"model": model, "messages": [{"role": "user", "content": questions[i % len(questions)]}],
                        "max_tokens": recipe.probe.max_tokens, "temperature": 0.0, "seed": recipe.probe.seed,
                        "chat_template_kwargs": recipe.chat_template_kwargs}
                try:
                    left = max(0.1, deadline - time.monotonic())
                    results.append(await asyncio.wait_for(_one(client, f"{url}/v1/chat/completions", body,
                                                                stream=i % 2 == 1), left))
                except TimeoutError:  # still in flight at TIME_LIMIT: cut off, not failed
                    results.append({"cut_off": True, "stream": i % 2 == 1})
                except (httpx.HTTPError, httpx.StreamError, ValueError, KeyError, TypeError) as e:
                    results.append({"error": type(e).__name__, "stream": i % 2 == 1})

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - started


def load(url: str, recipe: Recipe, concurrency: int = 32, total: int = 256, time_limit_s: float = 300.0,
         out_dir: Path | None = None) -> dict[str, Any]:
    from lab.probe import client, load_questions, served_model, server_root
    from lab.runs import RUNS_DIR, write_json
    from lab.serve import auth_headers

    if concurrency < 1 or total < 1 or time_limit_s <= 0:
        raise LabError(f"load: CONCURRENCY={concurrency}, REQUESTS={total} and TIME_LIMIT={time_limit_s} must be "
                       "positive")
    url = server_root(url)
    model = served_model(client(url, recipe), recipe.serve.served_model_name, recipe.serve.api_key_env)
    probe = load_questions(recipe)
    questions = [q["q"] for q in probe["identity"] + probe["controls"]]
    results, wall = asyncio.run(_burst(url, model, questions, recipe, auth_headers(recipe, url), concurrency, total,
                                       time_limit_s))
    done = [r for r in results if "error" not in r and "cut_off" not in r]
    errors: dict[str, int] = {}
    for r in results:
        if "error" in r:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    latencies = [r["latency_s"] for r in done]
    ttfts = [r["ttft_s"] for r in done if r["stream"] and r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in done)
    report = {
        "url": url, "model": model, "concurrency": concurrency, "requests": total, "time_limit_s": time_limit_s,
        "sent": len(results), "completed": len(done), "errors": sum(errors.values()), "error_kinds": errors,
        "cut_off": sum("cut_off" in r for r in results), "not_sent": total - len(results),
        "streamed": sum(r["stream"] for r in results), "wall_s": round(wall, 2),
        "latency_p50_s": _percentile(latencies, 50), "latency_p99_s": _percentile(latencies, 99),
        "ttft_p50_s": _percentile(ttfts, 50), "ttft_p99_s": _percentile(ttfts, 99),
        "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1) if wall else None,
        "requests_per_s": round(len(done) / wall, 2) if wall else None,
    }
    out_dir = out_dir or RUNS_DIR / "load"
    out_dir.mkdir(parents=True, exist_ok=True)
    report["file"] = str(out_dir / f"load-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    write_json(Path(report["file"]), report)
    return report
