"""Remote reward servers over HTTP: `--remote_rm_url http://host:port/path[,http://...]`, as in OpenRLHF.

Protocol (OpenRLHF's `request_api_wrapper` / `serve_rm`): one POST per request with
the JSON body

    {"query": [prompt+response, ...], "prompts": [prompt, ...], "labels": [label or null, ...]}

answered (HTTP 200) with {"rewards": [one number per query], "scores": [...] (optional),
"extra_logs": {name: number or [per query]} (optional)}; a bare JSON list of numbers is
accepted too. `scripts/reward_server_example.py` serves any reward.py this way.

Several URLs: the batch is cut into contiguous chunks of ceil(B / N) queries and chunk i
goes to server i (OpenRLHF's split), all at once; the answers are joined in order. With
B < N some servers get nothing that step.

Failures: each request has a socket timeout of `timeout_s` seconds (for the connection
and for each read, so a server that sends nothing for that long fails). Connection
errors, timeouts and HTTP 5xx/408/429 are retried `retries` times after the first try,
waiting backoff_s * 2**k seconds before retry k+1; other HTTP errors and malformed
answers fail at once. All attempts of one request share a total deadline of `deadline_s`
seconds (default: every attempt's timeout plus the waits), checked between reads, so a
server that trickles its answer cannot hold a step forever. Everything is the standard
library (urllib); proxies in the environment (http_proxy/no_proxy) are honoured as urllib does.

Security: a token (`--remote_rm_token`, else the JAXRLHF_RM_TOKEN environment variable)
is sent as `Authorization: Bearer TOKEN`; scripts/reward_server_example.py checks it.
Redirects are refused (an answer from another host is never taken as rewards, and the
token is never sent elsewhere).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from jaxrlhf.rewards.function import (
    RewardError,
    RewardResult,
    check_batch,
    concat_results,
    parse_reward_output,
    truncate,
)

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429})  # plus every 5xx
TOKEN_ENV = "JAXRLHF_RM_TOKEN"  # read when no token is given; scripts/reward_server_example.py reads it too
SERVER_HINT = "python scripts/reward_server_example.py --reward_file reward.py --port 5000"


def check_url(url: str) -> str:
    """`url` if it is http(s)://host[:port][/path]; ValueError saying what is wrong otherwise."""
    parsed = urllib.parse.urlsplit(url)
    try:
        parsed.port  # noqa: B018 (raises ValueError on a port that is not a number in 0..65535)
    except ValueError as exc:
        raise ValueError(f"reward server URL {url!r} has a bad port ({exc}); use http://host:port/path") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(
            f"reward server URL {url!r} must look like http://host:port/path (scheme http or https, a host)"
        )
    return url


def split_batch(batch_size: int, num_servers: int) -> list[tuple[int, int]]:
    """OpenRLHF's split of a batch over servers: chunk = ceil(B / N), server i gets [i*chunk, min((i+1)*chunk, B)).

    Returns (start, end) per server; empty ranges are kept so index i is server i.
    """
    chunk = -(-batch_size // num_servers) if batch_size else 0
    return [(min(i * chunk, batch_size), min((i + 1) * chunk, batch_size)) for i in range(num_servers)]


def _error_body(exc: urllib.error.HTTPError) -> str:
    try:
        return truncate(exc.read().decode("utf-8", errors="replace").strip(), 300) or "(empty body)"
    except Exception:  # the body is only for the message
        return "(body unreadable)"


def _network_failure(exc: BaseException, timeout_s: float) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return f"no answer within the {timeout_s:g}s timeout"
    return f"{type(reason).__name__}: {reason}"


class _Redirected(Exception):
    def __init__(self, code: int, location: str):
        super().__init__(code, location)
        self.code, self.location = code, location


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise _Redirected(code, newurl)


_OPENER = urllib.request.build_opener(_RefuseRedirects)


class _Deadline(Exception):
    pass


def _read_before(response, deadline: float) -> bytes:
    """The response body, read chunk by chunk; _Deadline when the clock passes ``deadline`` first."""
    chunks = []
    while True:
        if time.monotonic() > deadline:
            raise _Deadline
        chunk = response.read1(1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def default_deadline(timeout_s: float, retries: int, backoff_s: float) -> float:
    """Every attempt's timeout plus every wait between attempts: the default total deadline of one request."""
    return timeout_s * (1 + retries) + sum(backoff_s * 2**k for k in range(retries))


def post_json(url: str, payload: Any, *, timeout_s: float, retries: int, backoff_s: float,
              token: str | None = None, deadline_s: float | None = None) -> Any:
    """POST `payload` as JSON to `url` and return the decoded JSON answer, retrying transient failures.

    RewardError when every attempt failed or the total deadline passed (saying the URL and what was tried), on a
    non-retryable HTTP status, on a redirect, or when the answer is not JSON.
    """
    body = json.dumps(payload).encode("utf-8")
    attempts = 1 + max(0, retries)
    deadline_s = default_deadline(timeout_s, retries, backoff_s) if deadline_s is None else deadline_s
    deadline = time.monotonic() + deadline_s
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    failures: list[str] = []
    for attempt in range(attempts):
        if attempt:
            delay = min(backoff_s * 2 ** (attempt - 1), max(0.0, deadline - time.monotonic()))
            logger.warning("reward server %s: attempt %d/%d failed (%s); retrying in %.2gs",
                           url, attempt, attempts, failures[-1], delay)
            time.sleep(delay)
        left = deadline - time.monotonic()
        if left <= 0:
            failures.append(f"total deadline of {deadline_s:g}s passed")
            break
        request = urllib.request.Request(url, data=body, method="POST", headers=headers)
        try:
            with _OPENER.open(request, timeout=min(timeout_s, left)) as response:
                raw = _read_before(response, deadline)
                status = response.status
        except _Redirected as exc:
            raise RewardError(
                f"reward server {url} answered with a redirect (HTTP {exc.code}, Location: {exc.location}); "
                "redirects are refused: put the final URL in --remote_rm_url"
            ) from None
        except _Deadline:
            failures.append(f"the answer was still arriving at the total deadline of {deadline_s:g}s")
            break
        except urllib.error.HTTPError as exc:
            detail = _error_body(exc)
            if exc.code >= 500 or exc.code in RETRY_STATUSES:
                failures.append(f"HTTP {exc.code}: {detail}")
                continue
            hint = (f"the server wants a token: set {TOKEN_ENV} (or --remote_rm_token) to the server's token"
                    if exc.code == 401 else
                    "Check the URL path and that the server speaks OpenRLHF's protocol "
                    '(POST {"query": [...], "prompts": [...], "labels": [...]} -> {"rewards": [...]})')
            raise RewardError(
                f"reward server {url} rejected the request with HTTP {exc.code} {exc.reason}: {detail}. {hint}"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:  # URLError, refused, reset, timeout, bad status line
            failures.append(_network_failure(exc, timeout_s))
            continue
        text = raw.decode("utf-8", errors="replace")
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise RewardError(
                f"reward server {url} answered HTTP {status} with malformed JSON ({exc.msg} at position {exc.pos}): "
                f"{truncate(text, 300)!r}"
            ) from exc
    waits = ", ".join(f"{backoff_s * 2**k:g}s" for k in range(attempts - 1)) or "none"
    raise RewardError(
        f"reward server {url} failed: {attempts} attempt(s) (timeout {timeout_s:g}s each, waits between them: "
        f"{waits}; total deadline {deadline_s:g}s) all failed; errors: "
        f"{truncate('; '.join(failures), 600)}. Is the server running and "
        f"reachable from this machine? Start one with `{SERVER_HINT}`."
    )


class HttpRewardClient:
    """Reward servers at one or more URLs, called with OpenRLHF's JSON protocol.

    `client(queries, prompts, labels) -> RewardResult`; the batch is split over the
    servers as described in the module docstring.
    """

    def __init__(self, urls: Sequence[str], *, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.5,
                 token: str | None = None, deadline_s: float | None = None):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("HttpRewardClient needs at least one reward server URL")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or (deadline_s is not None and deadline_s <= 0):
            raise ValueError(f"need timeout_s > 0, retries >= 0, backoff_s >= 0, deadline_s > 0; got {timeout_s}, "
                             f"{retries}, {backoff_s}, {deadline_s}")
        self.urls = [check_url(u) for u in urls]
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.token = (os.environ.get(TOKEN_ENV) if token is None else token) or None  # "" or unset: no token
        self.deadline_s = deadline_s

    def __repr__(self) -> str:
        return f"HttpRewardClient({self.urls!r}, timeout_s={self.timeout_s}, retries={self.retries})"

    def _score_chunk(self, url: str, queries: list[str], prompts: list[str], labels: list[str | None]) -> RewardResult:
        payload = {"query": queries, "prompts": prompts, "labels": labels}
        answer = post_json(url, payload, timeout_s=self.timeout_s, retries=self.retries, backoff_s=self.backoff_s,
                           token=self.token, deadline_s=self.deadline_s)
        return parse_reward_output(answer, batch_size=len(queries), source=f"reward server {url}")

    def __call__(
        self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[str | None]
    ) -> RewardResult:
        batch_size = check_batch(queries, prompts, labels)
        jobs = [
            (url, list(queries[start:end]), list(prompts[start:end]), list(labels[start:end]))
            for url, (start, end) in zip(self.urls, split_batch(batch_size, len(self.urls)))
            if end > start
        ]
        if len(jobs) <= 1:
            results = [self._score_chunk(*job) for job in jobs]
        else:
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
                futures = [pool.submit(self._score_chunk, *job) for job in jobs]
                results = [f.result() for f in futures]  # the first failing chunk's error, in batch order
        return concat_results(results, sources=[f"reward server {job[0]}" for job in jobs])
