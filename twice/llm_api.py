"""A small OpenAI-compatible chat-completions client (stdlib only): the Stage-1 teacher and the RQ2 judge.

Works with vLLM, llama.cpp's server, hosted APIs and our own `python -m twice.serve`. Retries 429 / 5xx /
timeouts / dropped connections with exponential backoff and jitter; fails fast, with a message that says what to
check, when the endpoint is unreachable or the key is refused. The API key is read from the environment variable
named in the config and is never logged or saved.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass
class LLMConfig:
    base_url: str = "http://127.0.0.1:8000/v1"   # ".../v1"; the client posts to {base_url}/chat/completions
    model: str = "local"
    api_key_env: str = ""            # name of the env var holding the key ("" = no key)
    temperature: float = 0.7
    max_tokens: int = 512
    timeout_s: float = 120.0         # per request
    max_retries: int = 5
    backoff_s: float = 1.0           # first retry waits ~backoff_s, doubling, with jitter
    concurrency: int = 4             # requests in flight


class LLMError(RuntimeError):
    """A request that cannot succeed (bad key, unreachable endpoint, retries exhausted)."""


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


RETRYABLE_HTTP = {408, 409, 425, 429, 500, 502, 503, 504}


class ChatClient:
    def __init__(self, cfg: LLMConfig):
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        if cfg.api_key_env and not self._key:
            raise LLMError(f"the API key variable ${cfg.api_key_env} named in the config is not set")

    def _post(self, payload: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
            return json.loads(resp.read().decode())

    def chat(self, messages: list[dict], **overrides) -> Completion:
        """One chat completion, with retries. Raises LLMError when it cannot succeed."""
        payload = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                   "max_tokens": self.cfg.max_tokens, **overrides}
        last = None
        for attempt in range(self.cfg.max_retries + 1):
            try:
                body = self._post(payload)
                choice = body["choices"][0]["message"]["content"]
                usage = body.get("usage") or {}
                return Completion(choice or "", usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                if e.code in (401, 403):
                    raise LLMError(f"{self.url}: the key was refused (HTTP {e.code}): {detail}") from None
                if e.code not in RETRYABLE_HTTP:
                    raise LLMError(f"{self.url}: HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
            except urllib.error.URLError as e:
                if isinstance(e.reason, (TimeoutError, socket.timeout)):
                    last = f"timed out after {self.cfg.timeout_s}s (connecting)"
                elif isinstance(e.reason, ConnectionRefusedError) or "refused" in str(e.reason).lower():
                    if attempt >= 1:  # one retry for a server still starting, then a clear error
                        raise LLMError(f"{self.url} is unreachable (connection refused): is the server running "
                                       f"and is base_url right?") from None
                    last = f"connection refused: {e.reason}"
                else:
                    last = f"connection error: {e.reason}"
            except (TimeoutError, socket.timeout):
                last = f"timed out after {self.cfg.timeout_s}s"
            except (ConnectionError, http.client.HTTPException, json.JSONDecodeError, KeyError, IndexError,
                    TypeError, UnicodeDecodeError) as e:
                last = f"bad response: {type(e).__name__}: {e}"
            if attempt < self.cfg.max_retries:
                time.sleep(self.cfg.backoff_s * (2 ** attempt) * (0.5 + random.random()))
        raise LLMError(f"{self.url}: giving up after {self.cfg.max_retries + 1} attempts; last error: {last}")

    def preflight(self) -> Completion:
        """One tiny request before a long run, so a wrong URL, a refused key or a dead server is a clear error up
        front (LLMError) instead of N counted failures. Retries a 429/5xx like any request."""
        try:
            return self.chat([{"role": "user", "content": "Reply with OK."}], max_tokens=1, temperature=0.0)
        except LLMError as e:
            raise LLMError(f"preflight request failed: {e}") from None

    def chat_many(self, conversations: list[list[dict]], on_result=None, per_request: list[dict] | None = None,
                  **overrides) -> list[Completion | LLMError]:
        """Bounded-concurrency map over conversations. A failed request becomes an LLMError in its slot (the
        caller counts it) instead of aborting the batch; `on_result(i, result)` is called as each one finishes.
        per_request: optional payload fields per conversation (e.g. {"seed": 7}), on top of overrides."""
        def one(i):
            try:
                extra = per_request[i] if per_request is not None else {}
                out = self.chat(conversations[i], **{**overrides, **extra})
            except LLMError as e:
                out = e
            if on_result is not None:
                on_result(i, out)
            return out
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
            return list(pool.map(one, range(len(conversations))))
