"""kvroute serve tokenizes exactly as vLLM would: checked against Python transformers.

A byte-level BPE is trained here with the `tokenizers` package and saved as three model
directories with chat templates written in the styles of ChatML/Qwen, Llama 3 and Gemma
(tokenize_fixtures.py). For >= 200 requests (completions and chat: multi-turn, system
prompts, non-ASCII, tools and tool calls, multi-part content, continue_final_message),
transformers (AutoTokenizer + apply_chat_template, the conversation prepared as vLLM 0.33
prepares it) gives the reference ids; the real `kvroute serve` binary, started on each
model directory, must answer the same ids from its dry run (POST /kvroute/route).
"""

import http.server
import json
import os
import pathlib
import re
import subprocess
import threading
import urllib.request

import pytest

import tokenize_fixtures

ROOT = pathlib.Path(__file__).resolve().parents[3]


def kvroute_binary():
    found = [p for p in (ROOT / "target" / d / "kvroute" for d in ("release", "debug")) if p.exists()]
    if not found:
        pytest.fail("target/{release,debug}/kvroute is missing: cargo build -p kvroute-cli")
    return max(found, key=lambda p: p.stat().st_mtime)


class _Backend(http.server.BaseHTTPRequestHandler):
    """A backend that is healthy; the dry run never forwards to it."""

    def do_GET(self):
        body = b"ok" if self.path == "/health" else b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.send_response(500)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def backend():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


class Serve:
    """A running `kvroute serve` on a model directory."""

    def __init__(self, model_dir, backend):
        self.proc = subprocess.Popen(
            [str(kvroute_binary()), "serve", "--listen", "127.0.0.1:0", "--backend", backend,
             "--tokenizer", str(model_dir), "--log", "warn"],
            stderr=subprocess.PIPE, text=True,
        )
        line = self.proc.stderr.readline()
        m = re.search(r"listening on (\S+)", line)
        assert m, f"kvroute serve did not start: {line}{self.proc.stderr.read() if self.proc.poll() is not None else ''}"
        self.url = f"http://{m.group(1)}"
        for _ in range(200):
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            threading.Event().wait(0.05)

    def route(self, body):
        req = urllib.request.Request(
            self.url + "/kvroute/route", data=json.dumps(body, ensure_ascii=False).encode(),
            headers={"content-type": "application/json"}, method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def test_kvroute_serve_token_ids_equal_transformers(tmp_path, backend):
    vectors = tokenize_fixtures.build_all(tmp_path)
    assert len(vectors) >= 200
    kinds = {(v["model"], v["kind"]) for v in vectors}
    assert len(kinds) == 6
    assert sum("tools" in v["body"] for v in vectors) >= 10
    servers = {}
    try:
        for v in vectors:
            name = v["model"]
            if name not in servers:
                servers[name] = Serve(tmp_path / name, backend)
            got = servers[name].route(v["body"])
            assert got["prompt_token_ids"] == v["ids"], (name, v["kind"], v["body"])
            assert got["worker"] == backend.removeprefix("http://")
            assert got["total_blocks"] == len(v["ids"]) // 16
    finally:
        for s in servers.values():
            s.close()


def test_a_template_error_is_a_400_with_its_reason(tmp_path, backend):
    d = tokenize_fixtures.build_model_dir("gemma", tmp_path / "gemma")
    s = Serve(d, backend)
    try:
        body = {"messages": [{"role": "assistant", "content": "first"}]}
        with pytest.raises(urllib.error.HTTPError) as e:
            s.route(body)
        assert e.value.code == 400
        err = json.load(e.value)["error"]
        assert "Conversation roles must alternate" in err["message"]
    finally:
        s.close()
