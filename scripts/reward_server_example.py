"""A small HTTP reward server that serves a reward.py over OpenRLHF's remote-RM protocol.

    export JAXRLHF_RM_TOKEN=$(python -c "import secrets; print(secrets.token_hex(16))")
    python scripts/reward_server_example.py --reward_file reward.py --port 5000
    python -m jaxrlhf.ppo ... --remote_rm_url http://127.0.0.1:5000/get_reward   # same JAXRLHF_RM_TOKEN

reward.py defines `reward_func(queries, prompts, labels)` exactly as for
`--remote_rm_url reward.py` (see jaxrlhf/rewards/function.py). Any POST path is
served (OpenRLHF's serve_rm uses /get_reward); a GET answers {"status": "ok"} as a
health check.

Request:  {"query": [prompt+response, ...], "prompts": [...], "labels": [...]}
          (prompts/labels may be missing, as older OpenRLHF clients sent only "query";
          then reward_func gets None for them).
Answer:   200 {"rewards": [...], "scores": [...]?, "extra_logs": {...}?}
          400 {"error": ...} for a malformed request, 401 without the token, 413 for a body over
          --max_body_mb, 500 {"error": ...} when reward_func raises (the exception goes to this
          server's log, not to the client; clients retry 5xx).

Safety: the default host is 127.0.0.1; pass --host 0.0.0.0 to accept connections from
other machines, and then set a token (--token, or the JAXRLHF_RM_TOKEN environment
variable, which keeps it out of `ps`): every POST must carry `Authorization: Bearer TOKEN`
(compared in constant time). Each connection has a read timeout (--read_timeout), bodies
are limited (--max_body_mb), and at most --max_workers requests are handled at once (more
wait in the listen queue).

Only the standard library is used (reward.py may of course import torch, numpy, ...),
so this file can be copied to a machine without jaxrlhf. reward_func is called by one
request at a time (a lock), so it need not be thread-safe.
"""

from __future__ import annotations

import argparse
import hmac
import importlib.util
import json
import os
import sys
import threading
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN_ENV = "JAXRLHF_RM_TOKEN"  # the HTTP reward client (jaxrlhf/rewards/http.py) reads the same variable


def load_reward_func(path: str) -> Callable[..., Any]:
    """`reward_func` from the Python file at `path`, imported with importlib (ValueError when it has none)."""
    abspath = os.path.abspath(path)
    if not os.path.isfile(abspath):
        raise ValueError(f"reward file {path!r} not found (looked at {abspath})")
    spec = importlib.util.spec_from_file_location("reward_server_reward_func", abspath)
    if spec is None or spec.loader is None:
        raise ValueError(f"reward file {abspath}: Python cannot import it")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    reward_func = getattr(module, "reward_func", None)
    if not callable(reward_func):
        raise ValueError(f"reward file {abspath} must define `def reward_func(queries, prompts, labels): ...`")
    return reward_func


def to_json_value(value: Any) -> Any:
    """Lists/arrays/tensors/scalars as plain JSON values (tensors and arrays through .tolist())."""
    if hasattr(value, "detach"):  # torch.Tensor on any device
        value = value.detach().float().cpu() if value.is_floating_point() else value.detach().cpu()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    return value


def reward_answer(output: Any) -> dict[str, Any]:
    """What reward_func returned, as the JSON answer: {"rewards", and "scores"/"extra_logs" when given}."""
    if isinstance(output, dict):
        if "rewards" not in output:
            raise ValueError(f"reward_func returned a dict without 'rewards' (keys: {sorted(output)})")
        answer = {"rewards": to_json_value(output["rewards"])}
        for key in ("scores", "extra_logs"):
            if output.get(key) is not None:
                answer[key] = to_json_value(output[key])
        return answer
    return {"rewards": to_json_value(output)}


class RewardHandler(BaseHTTPRequestHandler):
    """OpenRLHF's remote-RM protocol over `self.server.reward_func`."""

    server: RewardServer

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _discard_body(self, length: int) -> None:
        """Read and drop a refused body (up to 4x the limit) so the client gets the answer, not a reset."""
        self.close_connection = True
        left = min(length, 4 * self.server.max_body_bytes)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._send(200, {"status": "ok"})

    def do_POST(self) -> None:  # noqa: N802
        server = self.server
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if server.token and not hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                                    f"Bearer {server.token}".encode()):
            self._discard_body(length)
            self._send(401, {"error": f"missing or wrong token: send 'Authorization: Bearer TOKEN' (the client "
                                      f"reads it from --remote_rm_token or {TOKEN_ENV})"})
            return
        if length > server.max_body_bytes:
            self._discard_body(length)
            self._send(413, {"error": f"request body of {length} bytes is over this server's limit of "
                                      f"{server.max_body_bytes} bytes: send smaller batches or raise --max_body_mb"})
            return
        try:
            if length <= 0:
                raise ValueError(f"need a JSON body with a Content-Length of 1..{server.max_body_bytes} bytes")
            data = json.loads(self.rfile.read(length))
            queries = data["query"]
            if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
                raise ValueError("'query' must be a list of strings")
            prompts = data.get("prompts") or [None] * len(queries)
            labels = data.get("labels") or [None] * len(queries)
            if not (len(prompts) == len(labels) == len(queries)):
                raise ValueError(
                    f"'query', 'prompts', 'labels' need equal lengths, "
                    f"got {len(queries)}, {len(prompts)}, {len(labels)}"
                )
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            self._send(400, {"error": f"bad request: {type(exc).__name__}: {exc}"})
            return
        try:
            with server.lock:
                output = server.reward_func(queries, prompts, labels)
            answer = reward_answer(output)
        except Exception:
            traceback.print_exc()  # the details stay here: they may hold data the client must not see
            self._send(500, {"error": "reward_func failed on this request; the reward server's log has the error"})
            return
        self._send(200, answer)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        if not self.server.quiet:
            super().log_message(format, *args)


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server answering OpenRLHF reward requests with `reward_func`.

    Port 0 picks a free port: read it back from `server.server_address[1]` (or `server.url`).
    Run it with `server.serve_forever()` (e.g. in a thread); stop with `shutdown()` then `server_close()`.
    `token`: required as `Authorization: Bearer TOKEN` on every POST (None or "": no check).
    `read_timeout_s`: a connection that sends nothing for that long is closed. `max_body_bytes`:
    larger requests get 413. `max_workers`: requests handled at once (the rest wait to be accepted).
    """

    daemon_threads = True  # a slow request does not keep the process (or a test) alive

    def __init__(self, reward_func: Callable[..., Any], host: str = "127.0.0.1", port: int = 0, quiet: bool = False,
                 *, token: str | None = None, read_timeout_s: float = 60.0, max_body_bytes: int = 64 << 20,
                 max_workers: int = 16):
        if read_timeout_s <= 0 or max_body_bytes < 1 or max_workers < 1:
            raise ValueError(f"need read_timeout_s > 0, max_body_bytes >= 1, max_workers >= 1; got "
                             f"{read_timeout_s}, {max_body_bytes}, {max_workers}")
        self.reward_func = reward_func
        self.lock = threading.Lock()
        self.quiet = quiet
        self.token = token or None
        self.max_body_bytes = max_body_bytes
        self.slots = threading.BoundedSemaphore(max_workers)
        handler = type("Handler", (RewardHandler,), {"timeout": read_timeout_s})  # per-connection socket timeout
        super().__init__((host, port), handler)

    def process_request(self, request, client_address) -> None:
        self.slots.acquire()  # a bounded pool: with every worker busy, new connections wait in the listen queue
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/get_reward"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="reward_server_example.py", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument(
        "--reward_file", required=True, help="Python file defining reward_func(queries, prompts, labels)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    parser.add_argument("--port", type=int, default=5000, help="port (0: any free port, printed at start)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"require 'Authorization: Bearer TOKEN' on every request (default: ${TOKEN_ENV}; "
                             "prefer the variable: a flag shows in `ps`)")
    parser.add_argument("--read_timeout", type=float, default=60.0, help="seconds a connection may stay silent")
    parser.add_argument("--max_body_mb", type=float, default=64.0, help="largest request body in MiB (413 above)")
    parser.add_argument("--max_workers", type=int, default=16, help="requests handled at once")
    parser.add_argument("--quiet", action="store_true", help="do not log every request")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token:
        print(f"warning: listening on {args.host} without a token: anyone who reaches the port can call "
              f"reward_func; set {TOKEN_ENV} (or --token)", file=sys.stderr)
    try:
        reward_func = load_reward_func(args.reward_file)
        server = RewardServer(reward_func, args.host, args.port, quiet=args.quiet, token=args.token,
                              read_timeout_s=args.read_timeout, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                              max_workers=args.max_workers)
    except ValueError as e:
        parser.error(str(e))
    except OSError as e:  # the port is taken, the address is not this machine's, ...
        parser.error(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    print(f"serving {os.path.abspath(args.reward_file)}{' (token required)' if server.token else ''} at {server.url}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
