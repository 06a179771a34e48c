"""A small HTTP reward server that serves a reward.py over OpenRLHF's remote-RM protocol.

    python scripts/reward_server_example.py --reward_file reward.py --port 5000
    python -m jaxrlhf.ppo ... --remote_rm_url http://127.0.0.1:5000/get_reward

reward.py defines `reward_func(queries, prompts, labels)` exactly as for
`--remote_rm_url reward.py` (see jaxrlhf/rewards/function.py). Any POST path is
served (OpenRLHF's serve_rm uses /get_reward); a GET answers {"status": "ok"} as a
health check.

Request:  {"query": [prompt+response, ...], "prompts": [...], "labels": [...]}
          (prompts/labels may be missing, as older OpenRLHF clients sent only "query";
          then reward_func gets None for them).
Answer:   200 {"rewards": [...], "scores": [...]?, "extra_logs": {...}?}
          400 {"error": ...} for a malformed request, 500 {"error": ...} when reward_func
          raises (clients retry 5xx).

Only the standard library is used (reward.py may of course import torch, numpy, ...),
so this file can be copied to a machine without jaxrlhf. reward_func is called by one
request at a time (a lock), so it need not be thread-safe. The default host is
127.0.0.1; pass --host 0.0.0.0 to accept connections from other machines.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY_BYTES = 1 << 30


def load_reward_func(path: str) -> Callable[..., Any]:
    """`reward_func` from the Python file at `path`, imported with importlib."""
    abspath = os.path.abspath(path)
    if not os.path.isfile(abspath):
        raise SystemExit(f"reward file {path!r} not found (looked at {abspath})")
    spec = importlib.util.spec_from_file_location("reward_server_reward_func", abspath)
    if spec is None or spec.loader is None:
        raise SystemExit(f"reward file {abspath}: Python cannot import it")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    reward_func = getattr(module, "reward_func", None)
    if not callable(reward_func):
        raise SystemExit(f"reward file {abspath} must define `def reward_func(queries, prompts, labels): ...`")
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

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._send(200, {"status": "ok"})

    def do_POST(self) -> None:  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= MAX_BODY_BYTES:
                raise ValueError(f"need a JSON body (Content-Length 1..{MAX_BODY_BYTES}), got {length}")
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
            with self.server.lock:
                output = self.server.reward_func(queries, prompts, labels)
            answer = reward_answer(output)
        except Exception as exc:
            traceback.print_exc()
            self._send(500, {"error": f"reward_func raised {type(exc).__name__}: {exc}"})
            return
        self._send(200, answer)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        if not self.server.quiet:
            super().log_message(format, *args)


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server answering OpenRLHF reward requests with `reward_func`.

    Port 0 picks a free port: read it back from `server.server_address[1]` (or `server.url`).
    Run it with `server.serve_forever()` (e.g. in a thread); stop with `shutdown()` then `server_close()`.
    """

    daemon_threads = True  # a slow request does not keep the process (or a test) alive

    def __init__(self, reward_func: Callable[..., Any], host: str = "127.0.0.1", port: int = 0, quiet: bool = False):
        self.reward_func = reward_func
        self.lock = threading.Lock()
        self.quiet = quiet
        super().__init__((host, port), RewardHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/get_reward"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reward_file", required=True, help="Python file defining reward_func(queries, prompts, labels)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    parser.add_argument("--port", type=int, default=5000, help="port (0: any free port, printed at start)")
    parser.add_argument("--quiet", action="store_true", help="do not log every request")
    args = parser.parse_args(argv)

    server = RewardServer(load_reward_func(args.reward_file), args.host, args.port, quiet=args.quiet)
    print(f"serving {os.path.abspath(args.reward_file)} at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
