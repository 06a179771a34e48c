"""Non-model reward sources (`--remote_rm_url`): reward .py files and HTTP reward servers.

Everything runs for real: reward files are written to tmp_path and imported, HTTP
servers listen on 127.0.0.1 (ephemeral ports) in threads or in a subprocess. Expected
rewards come from plain Python loops over the same inputs. Timing bounds are loose
(seconds) but small enough to catch a retry loop that ignores its limits.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrlhf.rewards import (
    HttpRewardClient,
    RewardError,
    RewardFunction,
    load_remote_reward,
    parse_remote_rm_url,
    split_batch,
)

REPO = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = REPO / "scripts" / "reward_server_example.py"

PROMPTS = ["Q: 1+1? A:", "Q: 2+2? A:", "Q: capital of France? A:", "Q: 3*3? A:", "Q: empty? A:"]
RESPONSES = [" 2", " five", " Paris", " 9", ""]
LABELS = ["2", "4", "Paris", "9", None]
QUERIES = [p + r for p, r in zip(PROMPTS, RESPONSES)]

# A rule-based reward in OpenRLHF's style: 1 for an exact answer, else -0.1 * response length.
REWARD_BODY = """
def _score(query, prompt, label):
    response = query[len(prompt):].strip()
    return 1.0 if label is not None and response == label else -0.1 * len(response)
"""
LIST_FILE = REWARD_BODY + """
def reward_func(queries, prompts, labels):
    return [_score(q, p, l) for q, p, l in zip(queries, prompts, labels)]
"""
DICT_FILE = REWARD_BODY + """
import numpy as np

def reward_func(queries, prompts, labels):
    rewards = np.array([_score(q, p, l) for q, p, l in zip(queries, prompts, labels)], dtype=np.float32)
    correct = (rewards == 1.0).astype(np.float32)
    return {"rewards": rewards, "scores": correct,
            "extra_logs": {"accuracy": float(correct.mean()),
                           "response_chars": [len(q) - len(p) for q, p in zip(queries, prompts)]}}
"""


def expected_rewards(queries, prompts, labels) -> np.ndarray:
    out = []
    for query, prompt, label in zip(queries, prompts, labels):
        response = query[len(prompt):].strip()
        out.append(1.0 if label is not None and response == label else -0.1 * len(response))
    return np.asarray(out, np.float32)


def write(tmp_path: Path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch):
    """A proxy in the environment would route 127.0.0.1 requests away from the test servers."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def load_server_module():
    spec = importlib.util.spec_from_file_location("reward_server_example", SERVER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


server_module = load_server_module()


class Serving:
    """Run an http.server in a daemon thread for the duration of a `with` block."""

    def __init__(self, server: http.server.HTTPServer):
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self.server

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class ScriptedHandler(http.server.BaseHTTPRequestHandler):
    """Answers each POST with the next scripted (status, body, delay_s) and records the request JSON."""

    def do_POST(self):  # noqa: N802
        length = int(self.headers["Content-Length"])
        self.server.requests.append(json.loads(self.rfile.read(length)))
        with self.server.lock:
            status, body, delay_s = self.server.script.pop(0) if len(self.server.script) > 1 else self.server.script[0]
        time.sleep(delay_s)
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout test)
            pass

    def log_message(self, *args):
        pass


def scripted_server(*script) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ScriptedHandler)
    server.daemon_threads = True
    server.script = list(script)  # the last entry repeats
    server.requests = []
    server.lock = threading.Lock()
    return server


def url_of(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/get_reward"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- reward .py files


def test_reward_file_returning_a_list(tmp_path):
    source = load_remote_reward(write(tmp_path, "reward.py", LIST_FILE))
    assert isinstance(source, RewardFunction)
    result = source(QUERIES, PROMPTS, LABELS)
    np.testing.assert_allclose(result.rewards, expected_rewards(QUERIES, PROMPTS, LABELS), rtol=0, atol=1e-6)
    assert result.rewards.dtype == np.float32 and result.rewards.shape == (5,)
    np.testing.assert_array_equal(result.scores, result.rewards)  # no "scores": scores are the rewards
    assert result.extra_logs == {}


def test_reward_file_returning_a_dict(tmp_path):
    result = load_remote_reward(write(tmp_path, "reward.py", DICT_FILE))(QUERIES, PROMPTS, LABELS)
    expected = expected_rewards(QUERIES, PROMPTS, LABELS)
    np.testing.assert_allclose(result.rewards, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(result.scores, (expected == 1.0).astype(np.float32))
    assert set(result.extra_logs) == {"accuracy", "response_chars"}
    np.testing.assert_allclose(result.extra_logs["accuracy"], np.full(5, 3 / 5), atol=1e-6)  # scalar repeated over B
    np.testing.assert_array_equal(result.extra_logs["response_chars"], [len(r) for r in RESPONSES])


def test_reward_file_returning_torch_tensors_like_openrlhf_examples(tmp_path):
    pytest.importorskip("torch")
    path = write(tmp_path, "reward.py", REWARD_BODY + """
import torch

def reward_func(queries, prompts, labels):
    reward = torch.tensor([_score(q, p, l) for q, p, l in zip(queries, prompts, labels)], dtype=torch.bfloat16)
    return {"rewards": reward, "scores": reward, "extra_logs": {"mean_reward": reward.float().mean()}}
""")
    result = load_remote_reward(path)(QUERIES, PROMPTS, LABELS)
    expected = expected_rewards(QUERIES, PROMPTS, LABELS)
    np.testing.assert_allclose(result.rewards, expected, rtol=1e-2, atol=1e-2)  # bfloat16 holds ~3 digits
    assert result.extra_logs["mean_reward"].shape == (5,)


def test_reward_file_that_raises_names_the_file_and_the_error(tmp_path):
    path = write(tmp_path, "broken_reward.py", """
def reward_func(queries, prompts, labels):
    raise KeyError("no grader for this label")
""")
    with pytest.raises(RewardError, match=r"broken_reward\.py.*raised KeyError.*no grader for this label") as info:
        load_remote_reward(path)(QUERIES, PROMPTS, LABELS)
    assert isinstance(info.value.__cause__, KeyError)


def test_reward_file_wrong_length_says_expected_and_got(tmp_path):
    source = "def reward_func(queries, prompts, labels):\n    return [0.0] * (len(queries) - 1)\n"
    path = write(tmp_path, "reward.py", source)
    with pytest.raises(RewardError, match=r"expected 5 values.*got shape \[4\]"):
        load_remote_reward(path)(QUERIES, PROMPTS, LABELS)


def test_reward_file_nan_is_rejected_with_its_position(tmp_path):
    path = write(tmp_path, "reward.py", """
def reward_func(queries, prompts, labels):
    return {"rewards": [0.0, float("nan"), 1.0, 2.0, float("inf")]}
""")
    with pytest.raises(RewardError, match=r"finite.*positions \[1, 4\].*expected 5 finite values, 2 are NaN/inf"):
        load_remote_reward(path)(QUERIES, PROMPTS, LABELS)


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "def reward_func(q, p, l):\n    return {'score': [0.0] * len(q)}\n",
            r"without a 'rewards' entry.*\['score'\]",
        ),
        ("def reward_func(q, p, l):\n    return ['good'] * len(q)\n", r"must be numbers.*dtype <U4"),
        ("def reward_func(q, p, l):\n    return None\n", r"expected a list of 5 numbers or a dict"),
        ("def reward_func(q, p, l):\n    return [[0.0]] * len(q)\n", r"expected 5 values.*got shape \[5, 1\]"),
    ],
)
def test_reward_file_malformed_returns(tmp_path, body, message):
    with pytest.raises(RewardError, match=message):
        load_remote_reward(write(tmp_path, "reward.py", body))(QUERIES, PROMPTS, LABELS)


def test_reward_file_load_errors(tmp_path):
    with pytest.raises(RewardError, match=r"not found"):
        load_remote_reward(str(tmp_path / "missing.py"))
    with pytest.raises(RewardError, match=r"defines no `reward_func`.*score"):
        load_remote_reward(write(tmp_path, "noname.py", "def score(q, p, l):\n    return q\n"))
    with pytest.raises(RewardError, match=r"syntax\.py failed to import: SyntaxError"):
        load_remote_reward(write(tmp_path, "syntax.py", "def reward_func(:\n"))
    with pytest.raises(RewardError, match=r"importerr\.py failed to import: ModuleNotFoundError"):
        load_remote_reward(write(tmp_path, "importerr.py", "import no_such_module_xyz\n"))


def test_spec_parsing():
    assert parse_remote_rm_url(" http://a:1/x , http://b:2/x ,") == ["http://a:1/x", "http://b:2/x"]
    assert parse_remote_rm_url("r.py") == ["r.py"]
    with pytest.raises(ValueError, match="either one .py reward file"):
        parse_remote_rm_url("a.py,b.py")
    with pytest.raises(ValueError, match="either one .py reward file"):
        parse_remote_rm_url("a.py,http://b:2/x")
    with pytest.raises(ValueError, match="neither a .py reward file nor an http"):
        parse_remote_rm_url("localhost:5000")
    with pytest.raises(ValueError, match="empty"):
        parse_remote_rm_url(" , ")
    with pytest.raises(ValueError, match="must look like http://host"):
        load_remote_reward("http:///get_reward")
    with pytest.raises(ValueError, match="bad port"):
        load_remote_reward("http://localhost:50x0/get_reward")


def test_split_batch_matches_openrlhf():
    # OpenRLHF: chunk = ceil(B / N); server i gets [i*chunk, min((i+1)*chunk, B)).
    for batch_size in range(0, 12):
        for servers in range(1, 5):
            chunk = math.ceil(batch_size / servers)
            expected = [(min(i * chunk, batch_size), min((i + 1) * chunk, batch_size)) for i in range(servers)]
            assert split_batch(batch_size, servers) == expected
            covered = [j for start, end in expected for j in range(start, end)]
            assert covered == list(range(batch_size))


# ---------------------------------------------------------------- HTTP reward servers


def test_http_server_script_serves_a_reward_file(tmp_path):
    func = server_module.load_reward_func(write(tmp_path, "reward.py", DICT_FILE))
    with Serving(server_module.RewardServer(func, "127.0.0.1", 0, quiet=True)) as server:
        source = load_remote_reward(server.url, timeout_s=5, retries=0)
        assert isinstance(source, HttpRewardClient)
        result = source(QUERIES, PROMPTS, LABELS)
    expected = expected_rewards(QUERIES, PROMPTS, LABELS)
    np.testing.assert_allclose(result.rewards, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(result.scores, (expected == 1.0).astype(np.float32))
    np.testing.assert_allclose(result.extra_logs["accuracy"], np.full(5, 0.6), atol=1e-6)
    np.testing.assert_array_equal(result.extra_logs["response_chars"], [len(r) for r in RESPONSES])


def test_http_sends_openrlhf_payload_and_accepts_its_answer():
    with Serving(scripted_server((200, {"rewards": [0.5, -1, 2, 0, 3]}, 0))) as server:
        result = HttpRewardClient([url_of(server)], timeout_s=5, retries=0)(QUERIES, PROMPTS, LABELS)
    assert server.requests == [{"query": QUERIES, "prompts": PROMPTS, "labels": LABELS}]
    np.testing.assert_array_equal(result.rewards, np.array([0.5, -1, 2, 0, 3], np.float32))


def test_http_several_servers_get_contiguous_chunks_in_parallel():
    # B=5 over 2 servers: chunk 3 -> server A gets samples 0..2, server B samples 3..4. Each sleeps 0.4 s.
    a = scripted_server((200, {"rewards": [1, 2, 3], "extra_logs": {"server": 0}}, 0.4))
    b = scripted_server((200, {"rewards": [4, 5], "extra_logs": {"server": 1}}, 0.4))
    with Serving(a), Serving(b):
        start = time.monotonic()
        result = load_remote_reward(f"{url_of(a)},{url_of(b)}", timeout_s=5, retries=0)(QUERIES, PROMPTS, LABELS)
        elapsed = time.monotonic() - start
    assert [r["query"] for r in a.requests] == [QUERIES[:3]] and [r["query"] for r in b.requests] == [QUERIES[3:]]
    assert a.requests[0]["labels"] == LABELS[:3] and b.requests[0]["prompts"] == PROMPTS[3:]
    np.testing.assert_array_equal(result.rewards, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(result.extra_logs["server"], [0, 0, 0, 1, 1])
    assert elapsed < 0.75, f"two 0.4 s requests took {elapsed:.2f}s: not sent in parallel"


def test_http_retries_5xx_then_succeeds():
    script = [(500, {"error": "warming up"}, 0), (503, "busy", 0), (200, {"rewards": [1, 1, 1, 1, 1]}, 0)]
    with Serving(scripted_server(*script)) as server:
        result = HttpRewardClient([url_of(server)], timeout_s=5, retries=3, backoff_s=0.01)(QUERIES, PROMPTS, LABELS)
    assert len(server.requests) == 3
    np.testing.assert_array_equal(result.rewards, np.ones(5, np.float32))


def test_http_5xx_every_time_fails_after_the_retries_with_the_server_message():
    with Serving(scripted_server((500, {"error": "reward_func raised ZeroDivisionError"}, 0))) as server:
        with pytest.raises(RewardError, match=r"3 attempt\(s\).*HTTP 500.*ZeroDivisionError"):
            HttpRewardClient([url_of(server)], timeout_s=5, retries=2, backoff_s=0.01)(QUERIES, PROMPTS, LABELS)
    assert len(server.requests) == 3


def test_http_4xx_is_not_retried():
    with Serving(scripted_server((404, "no such path", 0))) as server:
        with pytest.raises(RewardError, match=r"rejected the request with HTTP 404.*no such path"):
            HttpRewardClient([url_of(server)], timeout_s=5, retries=3, backoff_s=0.01)(QUERIES, PROMPTS, LABELS)
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "body, message",
    [
        ("<html>Bad Gateway</html>", r"malformed JSON.*<html>Bad Gateway</html>"),
        ({"score": [1, 2, 3, 4, 5]}, r"without a 'rewards' entry.*\['score'\]"),
        ({"rewards": [1, 2, 3]}, r"expected 5 values.*got shape \[3\]"),
        ({"rewards": [1, "x", 3, 4, 5]}, r"must be numbers.*dtype <U"),
        ({"rewards": [1, None, 3, 4, 5]}, r"must be numbers.*dtype object"),
        ('{"rewards": [1, NaN, 3, 4, 5]}', r"finite numbers.*positions \[1\]"),
        ({"rewards": [1, 2, 3, 4, 5], "extra_logs": {"acc": [1, 2]}}, r"extra_logs\['acc'\] must be one number or 5"),
        ("x" * 5000, r"malformed JSON.*more characters"),
    ],
)
def test_http_malformed_answers(body, message):
    with Serving(scripted_server((200, body, 0))) as server:
        with pytest.raises(RewardError, match=message) as info:
            HttpRewardClient([url_of(server)], timeout_s=5, retries=3, backoff_s=0.01)(QUERIES, PROMPTS, LABELS)
    assert url_of(server) in str(info.value)
    assert len(str(info.value)) < 1500  # the answer is quoted truncated
    assert len(server.requests) == 1  # a malformed answer is not retried


def test_http_unreachable_port_fails_fast_and_says_what_was_tried():
    url = f"http://127.0.0.1:{free_port()}/get_reward"
    start = time.monotonic()
    with pytest.raises(RewardError) as info:
        load_remote_reward(url, timeout_s=1.0, retries=2, backoff_s=0.05)(QUERIES, PROMPTS, LABELS)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert url in message and "3 attempt(s)" in message and "ConnectionRefusedError" in message
    assert "reward_server_example.py" in message
    assert elapsed < 3.0, f"refused connections took {elapsed:.2f}s"


def test_http_slow_server_times_out():
    with Serving(scripted_server((200, {"rewards": [0, 0, 0, 0, 0]}, 2.0))) as server:
        start = time.monotonic()
        with pytest.raises(RewardError, match=r"2 attempt\(s\) \(timeout 0.3s each.*no answer within the 0.3s timeout"):
            HttpRewardClient([url_of(server)], timeout_s=0.3, retries=1, backoff_s=0.01)(QUERIES, PROMPTS, LABELS)
        elapsed = time.monotonic() - start
    assert len(server.requests) == 2
    assert elapsed < 1.5, f"two 0.3 s timeouts took {elapsed:.2f}s"


def test_http_empty_batch_sends_nothing():
    with Serving(scripted_server((200, {"rewards": []}, 0))) as server:
        result = HttpRewardClient([url_of(server)], timeout_s=5, retries=0)([], [], [])
    assert server.requests == [] and result.rewards.shape == (0,) and result.rewards.dtype == np.float32


def test_reward_server_script_as_a_process(tmp_path):
    """`python scripts/reward_server_example.py --reward_file f.py --port 0`, then a client call and bad requests."""
    reward_file = write(tmp_path, "reward.py", LIST_FILE)
    proc = subprocess.Popen(
        [sys.executable, str(SERVER_SCRIPT), "--reward_file", reward_file, "--port", "0", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" at ")[-1].strip()
        result = load_remote_reward(url, timeout_s=10, retries=0)(QUERIES, PROMPTS, LABELS)
        np.testing.assert_allclose(result.rewards, expected_rewards(QUERIES, PROMPTS, LABELS), rtol=0, atol=1e-6)
        # A request without "query" is the client's fault: 400, not retried.
        import urllib.error
        import urllib.request

        request = urllib.request.Request(url, data=b'{"prompts": []}', headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 400 and "query" in info.value.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_reward_server_reports_reward_func_errors_as_500(tmp_path):
    func = server_module.load_reward_func(write(tmp_path, "reward.py", "def reward_func(q, p, l):\n    return 1 / 0\n"))
    with Serving(server_module.RewardServer(func, "127.0.0.1", 0, quiet=True)) as server:
        with pytest.raises(RewardError, match=r"2 attempt\(s\).*HTTP 500.*server's log has the error") as info:
            load_remote_reward(server.url, timeout_s=5, retries=1, backoff_s=0.01)(QUERIES, PROMPTS, LABELS)
    assert "ZeroDivisionError" not in str(info.value)  # the exception text stays in the server's log


# ---------------------------------------------------------------- hardening: token, limits, redirects, deadline


def test_reward_server_token_is_required_and_the_client_sends_it(tmp_path, monkeypatch):
    func = server_module.load_reward_func(write(tmp_path, "reward.py", LIST_FILE))
    monkeypatch.delenv("JAXRLHF_RM_TOKEN", raising=False)
    with Serving(server_module.RewardServer(func, "127.0.0.1", 0, quiet=True, token="s3cret")) as server:
        with pytest.raises(RewardError, match=r"HTTP 401.*missing or wrong token.*JAXRLHF_RM_TOKEN"):
            load_remote_reward(server.url, timeout_s=5, retries=2)(QUERIES, PROMPTS, LABELS)  # 401: not retried
        with pytest.raises(RewardError, match="HTTP 401"):
            load_remote_reward(server.url, timeout_s=5, retries=0, token="wrong")(QUERIES, PROMPTS, LABELS)
        expected = expected_rewards(QUERIES, PROMPTS, LABELS)
        got = load_remote_reward(server.url, timeout_s=5, retries=0, token="s3cret")(QUERIES, PROMPTS, LABELS)
        np.testing.assert_allclose(got.rewards, expected, atol=1e-6)
        monkeypatch.setenv("JAXRLHF_RM_TOKEN", "s3cret")  # the environment variable, as the PPO trainer reads it
        got = load_remote_reward(server.url, timeout_s=5, retries=0)(QUERIES, PROMPTS, LABELS)
        np.testing.assert_allclose(got.rewards, expected, atol=1e-6)


def test_reward_server_refuses_a_body_over_its_limit_with_413(tmp_path):
    func = server_module.load_reward_func(write(tmp_path, "reward.py", LIST_FILE))
    with Serving(server_module.RewardServer(func, "127.0.0.1", 0, quiet=True, max_body_bytes=200)) as server:
        with pytest.raises(RewardError, match=r"HTTP 413.*over this server's limit of 200 bytes.*--max_body_mb"):
            load_remote_reward(server.url, timeout_s=5, retries=2)(QUERIES, PROMPTS, LABELS)
        short = load_remote_reward(server.url, timeout_s=5, retries=0)(["a"], [""], [None])  # under the limit
    assert short.rewards.shape == (1,)


def test_reward_server_closes_silent_connections_and_bounds_its_workers(tmp_path):
    """Two idle connections fill a 2-worker server: a real request waits for the 0.5 s read timeout to free one."""
    func = server_module.load_reward_func(write(tmp_path, "reward.py", LIST_FILE))
    server = server_module.RewardServer(func, "127.0.0.1", 0, quiet=True, read_timeout_s=0.5, max_workers=2)
    with Serving(server):
        idle = [socket.create_connection(server.server_address[:2]) for _ in range(2)]
        try:
            idle[0].sendall(b"POST /get_reward HTTP/1.1\r\n")  # half a request, then silence
            start = time.monotonic()
            result = load_remote_reward(server.url, timeout_s=10, retries=0)(QUERIES, PROMPTS, LABELS)
            waited = time.monotonic() - start
            for s in idle:  # the server hung up on both silent connections
                s.settimeout(5)
                assert s.recv(1024) == b""
        finally:
            for s in idle:
                s.close()
    assert result.rewards.shape == (5,)
    assert 0.4 < waited < 5, waited


class RedirectHandler(http.server.BaseHTTPRequestHandler):
    """Answers every POST with 307 to ``server.location`` (a 307 keeps the method and body: urllib would follow)."""

    def do_POST(self):  # noqa: N802
        self.server.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(307)
        self.send_header("Location", self.server.location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_http_client_refuses_a_redirect_and_names_both_urls():
    with Serving(scripted_server((200, {"rewards": [9, 9, 9, 9, 9]}, 0))) as elsewhere:
        redirect = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RedirectHandler)
        redirect.daemon_threads, redirect.location, redirect.requests = True, url_of(elsewhere), []
        with Serving(redirect):
            with pytest.raises(RewardError, match=rf"{url_of(redirect)} answered with a redirect \(HTTP 307, "
                                                  rf"Location: {url_of(elsewhere)}\); redirects are refused"):
                HttpRewardClient([url_of(redirect)], timeout_s=5, retries=2, token="t")(QUERIES, PROMPTS, LABELS)
    assert len(redirect.requests) == 1 and elsewhere.requests == []  # not retried, never followed


class TrickleHandler(http.server.BaseHTTPRequestHandler):
    """Answers 200 with a body that arrives one byte every 0.1 s (each read is quick; the whole is slow)."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"rewards": [0, 0, 0, 0, 0]}).encode() + b" " * 100
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(len(body)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_http_total_deadline_stops_a_trickling_answer():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TrickleHandler)
    server.daemon_threads = True
    with Serving(server):
        start = time.monotonic()
        with pytest.raises(RewardError, match=r"total deadline 0.8s.*still arriving at the total deadline"):
            HttpRewardClient([url_of(server)], timeout_s=1, retries=3, deadline_s=0.8)(QUERIES, PROMPTS, LABELS)
        assert time.monotonic() - start < 3


def test_reward_server_script_with_a_token_from_the_environment(tmp_path):
    """The script reads JAXRLHF_RM_TOKEN; `--token` and the limits are flags; a 500 answer holds no exception text."""
    reward_file = write(tmp_path, "reward.py", "def reward_func(q, p, l):\n    raise RuntimeError('secret detail')\n")
    env = {**os.environ, "JAXRLHF_RM_TOKEN": "tok"}
    proc = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), "--reward_file", reward_file, "--port", "0",
                             "--quiet", "--read_timeout", "5", "--max_body_mb", "1", "--max_workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "(token required)" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" at ")[-1].strip()
        with pytest.raises(RewardError, match="HTTP 401"):
            load_remote_reward(url, timeout_s=10, retries=0, token="")(QUERIES, PROMPTS, LABELS)
        with pytest.raises(RewardError, match="HTTP 500") as info:
            load_remote_reward(url, timeout_s=10, retries=0, token="tok")(QUERIES, PROMPTS, LABELS)
        assert "secret detail" not in str(info.value)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
        assert "secret detail" in proc.stderr.read()  # logged on the server's side
        proc.stderr.close()
