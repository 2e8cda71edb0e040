"""A stand-in for `sglang.launch_server` as a real child process (stdlib only, starts fast): /model_info,
streamed /generate (one token every FAKE_SGLANG_DELAY seconds, SGLang's cumulative output_ids), /abort_request;
FAKE_SGLANG_GENERATE_LOG records each /generate, FAKE_SGLANG_FAIL_RIDS fails some.
Each start appends its argv to FAKE_SGLANG_RECORD, so a test can see what a restart was given.
FAKE_SGLANG_CHILDREN=1 starts SGLang's kind of process tree: a long-lived child named `sglang::scheduler_TP0`
(as setproctitle names it) and a short-lived unnamed one that exits after 1.5 s."""
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DELAY = float(os.environ.get("FAKE_SGLANG_DELAY", "0.05"))
GENERATE_LOG = os.environ.get("FAKE_SGLANG_GENERATE_LOG")  # one JSON line per /generate: rid, prompt, in flight
FAIL_RIDS = os.environ.get("FAKE_SGLANG_FAIL_RIDS")        # /generate answers 500 to rids with this prefix
LOCK, INFLIGHT = threading.Lock(), [0]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # bodies end when the connection closes: streaming without chunking

    def log_message(self, *args):
        pass

    def _json(self, obj, status=200):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._json({"model_path": "fake"} if self.path == "/model_info" else {}, 200 if self.path == "/model_info" else 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        if self.path != "/generate":
            return self._json({"success": True})
        n = body["sampling_params"]["max_new_tokens"]
        if GENERATE_LOG:
            with LOCK:
                INFLIGHT[0] += 1
                with open(GENERATE_LOG, "a") as f:
                    ids = body.get("input_ids") or []
                    f.write(json.dumps({"rid": body.get("rid"), "prompt_len": len(ids), "max_id": max(ids, default=-1),
                                        "max_new_tokens": n, "in_flight": INFLIGHT[0]}) + "\n")
        try:
            self._generate(body, n)
        finally:
            if GENERATE_LOG:
                with LOCK:
                    INFLIGHT[0] -= 1

    def _generate(self, body, n):
        if FAIL_RIDS and str(body.get("rid", "")).startswith(FAIL_RIDS):
            return self._json({"error": "injected"}, 500)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        ids = []
        for i in range(n):
            time.sleep(DELAY)
            ids.append(7)
            meta = {"spec_verify_ct": i + 1, "finish_reason": {"type": "length"} if i == n - 1 else None}
            self.wfile.write(f"data: {json.dumps({'output_ids': ids, 'meta_info': meta})}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


if __name__ == "__main__":
    argv = sys.argv[1:]
    with open(os.environ["FAKE_SGLANG_RECORD"], "a") as f:
        f.write(json.dumps(argv) + "\n")
    if os.environ.get("FAKE_SGLANG_CHILDREN") == "1":
        watch_parent = f"import os, time\nwhile os.getppid() == {os.getpid()}: time.sleep(0.2)"
        subprocess.Popen(["sglang::scheduler_TP0", "-c", watch_parent], executable=sys.executable)
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    time.sleep(float(os.environ.get("FAKE_SGLANG_START_DELAY", "0")))  # a real server takes a while to load
    ThreadingHTTPServer(("127.0.0.1", int(argv[argv.index("--port") + 1])), Handler).serve_forever()
