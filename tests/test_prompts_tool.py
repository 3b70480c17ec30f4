"""tools/make_prompts.py against a real local LLM (llama.cpp server + SmolLM2-135M).

The ``llm`` tests start llama.cpp's OpenAI-compatible server on loopback with the GGUF
that ``make test-deps`` installs into .cache/llm (scripts/install_llm.sh). Between the
tool and the server sits ``CountingProxy``, a loopback HTTP relay that counts chat
requests and records their bodies; only for the malformed-reply test does it corrupt
chosen replies, because the real server cannot be made to send a malformed reply on
demand. Everything else the tool sees is the real server's answer.

    make test-deps && .venv/bin/python -m pytest -q tests/test_prompts_tool.py
"""

from __future__ import annotations

import http.client
import http.server
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from claver_dist.text.prompts import CONTEXT_LENGTH, TEMPLATES, count_tokens, load_bank
from tools import make_prompts
from tools.make_prompts import FEW_SHOT, Cache, Item, clean_reply, prompt_hash

ROOT = Path(__file__).resolve().parent.parent
LLM_DIR = ROOT / ".cache" / "llm"
KINDS3 = "decomposition,body_parts,synonyms"


# ------------------------------------------------------------------ fixtures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def llm_server():
    """Base URL of a llama.cpp server started for this test session."""
    python, model_file = LLM_DIR / "venv" / "bin" / "python", LLM_DIR / "model_path"
    if not python.exists() or not model_file.exists():
        pytest.fail(f"local LLM not installed in {LLM_DIR}: run `make test-deps` "
                    "(scripts/install_llm.sh builds llama-cpp-python and fetches SmolLM2)")
    port = _free_port()
    log = open(LLM_DIR / "server-test.log", "w")
    proc = subprocess.Popen(
        [str(python), "-m", "llama_cpp.server", "--model", model_file.read_text().strip(),
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--verbose", "False"],
        stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama.cpp server exited with {proc.returncode}; see {log.name}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama.cpp server not answering on port {port} after 120 s; see {log.name}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class CountingProxy:
    """Loopback relay to the real server: counts and records chat-completion requests.

    ``corrupt`` maps a 1-based chat request number to how its reply is damaged
    ("truncate": the JSON body cut in half; "no-choices": valid JSON, empty choices).
    """

    def __init__(self, upstream: str, corrupt: dict[int, str] | None = None):
        host_port = upstream.split("//", 1)[1].split("/", 1)[0]
        self.up_host, up_port = host_port.split(":")
        self.up_port = int(up_port)
        self.corrupt = dict(corrupt or {})
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the OpenAI client expects

            def log_message(self, *a):
                pass

            def _relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                number = None
                if self.command == "POST" and self.path.endswith("/chat/completions"):
                    with proxy.lock:
                        proxy.bodies.append(json.loads(body))
                        number = len(proxy.bodies)
                conn = http.client.HTTPConnection(proxy.up_host, proxy.up_port, timeout=300)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                mode = proxy.corrupt.get(number)
                if mode == "truncate":
                    data = data[: len(data) // 2]
                elif mode == "no-choices":
                    obj = json.loads(data)
                    obj["choices"] = []
                    data = json.dumps(obj).encode()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = _relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.bodies)

    def asked(self) -> list[tuple[str, str, int]]:
        """(action, kind, variant) of every chat request so far (seed = variant + 1000*attempt)."""
        by_instruction = {spec["instruction"]: kind for kind, spec in FEW_SHOT.items()}
        out = []
        with self.lock:
            for b in self.bodies:
                action, task = b["messages"][-1]["content"].split("\n")
                out.append((action.removeprefix("Action: "), by_instruction[task.removeprefix("Task: ")],
                            b["seed"] % 1000))
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy_factory(llm_server):
    made = []

    def make(corrupt=None) -> CountingProxy:
        p = CountingProxy(llm_server, corrupt)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def labels3(tmp_path) -> Path:
    # One name in each dataset's spelling: Kinetics words, HMDB underscores, UCF CamelCase.
    path = tmp_path / "labels.csv"
    path.write_text("id,name\n0,abseiling\n1,brush_hair\n2,JumpingJack\n")
    return path


def _run_tool(labels: Path, out: Path, url: str, *extra: str) -> tuple[int, dict, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "tools.make_prompts", str(labels), "--out", str(out), "--base-url", url,
         "--model", "smollm2-135m", "--kinds", KINDS3, "--n", "2", "--no-progress", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return proc.returncode, summary, proc.stderr


# ------------------------------------------------------------------ with the real LLM


@pytest.mark.llm
def test_builds_a_bank_from_a_real_llm(proxy_factory, labels3, tmp_path):
    proxy = proxy_factory()
    out = tmp_path / "bank.json"
    rc, summary, err = _run_tool(labels3, out, proxy.url, "--seed", "7")
    assert rc == 0, err
    assert summary["items"] == 3 * 3 * 2 and summary["accepted"] == 18
    assert summary["requests"] == proxy.count == 18 + summary.get("rejected", 0)
    assert summary.get("malformed", 0) == 0

    bank = json.loads(out.read_text())
    assert [c["name"] for c in bank["classes"]] == ["abseiling", "brush_hair", "JumpingJack"]
    assert [c["id"] for c in bank["classes"]] == [0, 1, 2]
    for c in bank["classes"]:
        assert list(c["prompts"]) == KINDS3.split(",")
        for kind, texts in c["prompts"].items():
            assert len(texts) == 2 and len({t.lower() for t in texts}) == 2
            for t in texts:
                assert t.strip() == t and t and count_tokens(t) <= CONTEXT_LENGTH
    # the model saw readable names, not dataset identifiers
    assert {a for a, _, _ in proxy.asked()} == {"abseiling", "brush hair", "jumping jack"}

    prov = bank["provenance"]
    assert prov["model"] == "smollm2-135m" and prov["endpoint"] == proxy.url
    assert prov["prompt_sha256"] == prompt_hash()
    assert prov["parameters"]["temperature"] == 0.9 and prov["parameters"]["top_p"] == 0.95
    assert prov["parameters"]["seed"] == 7 and prov["parameters"]["n"] == 2
    assert prov["parameters"]["max_tokens"] == 77
    assert prov["method"].startswith("LLM") and prov["date"]

    # what training reads: 16 templates + 3 kinds x 2 variants per class
    pb = load_bank(str(labels3), str(out))
    assert pb.num_variants == len(TEMPLATES) + 6
    assert pb.texts[2][0] == TEMPLATES[0].format("jumping jack")
    assert len(pb.variant_texts([0, len(TEMPLATES)])) == 2 * 3
    assert load_bank(str(labels3), str(out), kinds=["synonyms"], use_templates=False).num_variants == 2

    # a complete cache: a re-run asks nothing and writes the same bank
    before = proxy.count
    rc, summary, err = _run_tool(labels3, out, proxy.url, "--seed", "7")
    assert rc == 0, err
    assert proxy.count == before and summary.get("requests", 0) == 0 and summary["cached"] == 18
    assert json.loads(out.read_text())["classes"] == bank["classes"]


@pytest.mark.llm
def test_interrupted_run_resumes_without_reasking(proxy_factory, labels3, tmp_path):
    proxy = proxy_factory()
    out = tmp_path / "bank.json"
    cache = tmp_path / "bank.json.cache.jsonl"
    cmd = [sys.executable, "-m", "tools.make_prompts", str(labels3), "--out", str(out),
           "--base-url", proxy.url, "--model", "smollm2-135m", "--kinds", KINDS3, "--n", "2",
           "--concurrency", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (cache.exists() and len(cache.read_text().splitlines()) >= 6):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no progress from the tool"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C midway
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "re-run" in err
    assert not out.exists()  # no half bank
    cached = [json.loads(l) for l in cache.read_text().splitlines()]
    done = {(r["class"], r["kind"], r["variant"]) for r in cached}
    assert 6 <= len(done) < 18
    first_run_requests = proxy.count

    proxy2 = proxy_factory()
    rc, summary, err = _run_tool(labels3, out, proxy2.url)
    assert rc == 0, err
    assert summary["cached"] == len(done)
    assert summary["accepted"] == 18 - len(done)
    assert proxy2.count == summary["requests"] == 18 - len(done) + summary.get("rejected", 0)
    readable = {"abseiling": "abseiling", "brush_hair": "brush hair", "JumpingJack": "jumping jack"}
    asked_again = set(proxy2.asked()) & {(readable[c], k, v) for c, k, v in done}
    assert not asked_again, f"finished items asked again: {asked_again}"
    # the cached texts are the bank's texts
    bank = json.loads(out.read_text())
    by_name = {c["name"]: c for c in bank["classes"]}
    for r in cached:
        assert by_name[r["class"]]["prompts"][r["kind"]][r["variant"]] == r["text"]
    print(f"resume: run 1 sent {first_run_requests} requests and cached {len(done)}; "
          f"run 2 sent {proxy2.count} for the {18 - len(done)} missing")


@pytest.mark.llm
def test_malformed_replies_are_counted_and_retried(proxy_factory, labels3, tmp_path):
    # The real server never sends these; the proxy damages replies 2 and 5.
    proxy = proxy_factory(corrupt={2: "truncate", 5: "no-choices"})
    out = tmp_path / "bank.json"
    rc, summary, err = _run_tool(labels3, out, proxy.url, "--limit", "1", "--concurrency", "1")
    assert rc == 0, err
    assert summary["malformed"] == 2 and summary["reasons"]["malformed"] == 2
    assert summary["accepted"] == 6
    assert proxy.count == summary["requests"] == 6 + 2 + summary.get("rejected", 0)
    # the damaged requests were asked again (same item, next attempt's seed)
    asked = proxy.asked()
    for n in (2, 5):
        action, kind, variant = asked[n - 1]
        assert (action, kind, variant) in asked[n:]
    bank = json.loads(out.read_text())
    assert all(len(t) == 2 for t in bank["classes"][0]["prompts"].values())


@pytest.mark.llm
def test_item_that_keeps_failing_is_reported_not_written(proxy_factory, labels3, tmp_path):
    proxy = proxy_factory(corrupt={i: "truncate" for i in range(1, 100)})
    out = tmp_path / "bank.json"
    rc, summary, err = _run_tool(labels3, out, proxy.url, "--limit", "1", "--kinds", "scene",
                                 "--n", "1", "--attempts", "3")
    assert rc == 1
    assert err.strip().splitlines()[-1].startswith("error: 1 texts still missing after 3 attempts")
    assert proxy.count == 3 and summary["malformed"] == 3
    assert not out.exists()


# ------------------------------------------------------------------ no server needed


def test_unreachable_endpoint_is_one_line_error(labels3, tmp_path):
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    rc, summary, err = _run_tool(labels3, tmp_path / "b.json", f"http://127.0.0.1:{port}/v1",
                                 "--retries", "1", "--timeout", "5")
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach http://127.0.0.1:{port}/v1")
    assert not (tmp_path / "b.json").exists()
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("content,message", [
    ("id,name\n0,a\n0,b\n", "error: bad labels file: .*bad.csv:3: duplicate id 0"),
    (None, "error: bad labels file: .*bad.csv: labels file not found"),
])
def test_bad_labels_file_is_one_line_error(tmp_path, content, message, capsys):
    import re

    labels = tmp_path / "bad.csv"
    if content is not None:
        labels.write_text(content)
    rc = make_prompts.main([str(labels), "--out", str(tmp_path / "b.json"),
                            "--base-url", "http://127.0.0.1:9/v1", "--model", "m"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and re.match(message, err[0])


def test_unknown_kind_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        make_prompts.main(["l.csv", "--out", "b.json", "--base-url", "u", "--model", "m", "--kinds", "smell"])
    assert e.value.code == 2 and "unknown kind 'smell'" in capsys.readouterr().err


def test_clean_reply_keeps_whole_sentences_within_77_tokens():
    s = "The climber leans back and walks down the rock face while feeding the rope through a device. "
    text, reason = clean_reply(s * 6, truncated=False)
    assert reason == "" and count_tokens(text) <= 77
    assert text.endswith("device.") and text.count("climber") >= 2  # several whole sentences kept
    long_one = "The climber " + "slowly and carefully " * 30 + "descends."
    assert clean_reply(long_one, truncated=False) == (None, "too-long")


def test_clean_reply_drops_cut_sentence_and_rejects_off_format():
    assert clean_reply("A person lifts the bar overhead. Then they lower it to the", truncated=True) == (
        "A person lifts the bar overhead.", "")
    assert clean_reply("Then they lower it to the", truncated=True) == (None, "truncated")
    assert clean_reply("  ", truncated=False) == (None, "empty")
    assert clean_reply(None, truncated=False) == (None, "empty")
    assert clean_reply("Sure! Here is a sentence about it.", truncated=False)[1] == "off-format"
    assert clean_reply("Decomposition\n- step one\n- step two", truncated=False)[1] == "off-format"
    assert clean_reply("Jumping.", truncated=False) == (None, "too-short")
    assert clean_reply('"Setting up a tent, erecting a shelter"', truncated=False) == (
        "Setting up a tent, erecting a shelter.", "")
    assert clean_reply("1. Swinging the arms up and over the head.", truncated=False)[0] == (
        "Swinging the arms up and over the head.")


def test_cache_ignores_a_line_cut_by_a_kill_and_other_settings(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = Cache(path, "fp1")
    cache.add(Item(0, "a", "scene", 0), "A quiet park with trees.")
    cache.close()
    with open(path, "a") as f:
        f.write(json.dumps({"fingerprint": "fp2", "class": "a", "kind": "scene", "variant": 1,
                            "text": "other settings"}) + "\n")
        f.write('{"fingerprint": "fp1", "class": "a", "ki')  # killed mid-write
    assert Cache(path, "fp1").texts == {("a", "scene", 0): "A quiet park with trees."}
