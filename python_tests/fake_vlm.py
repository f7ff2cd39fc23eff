"""A loopback OpenAI-compatible chat-completions server that answers from a script, for the code
reward's generation tests (python_tests/ is on sys.path)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeVLM:
    """Replies, one per request, in order: a str is the assistant's text; an int an HTTP status
    with an error body (429 with Retry-After: 0); ("sleep", seconds, reply) waits first (timeouts);
    ("raw", bytes) a 200 whose body is those bytes. Past the script: 500."""

    def __init__(self, replies: list):
        self.replies = list(replies)
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                fake.requests.append(json.loads(self.rfile.read(length)))
                fake.headers.append(dict(self.headers))
                reply = fake.replies.pop(0) if fake.replies else 500
                if self.path != "/v1/chat/completions":
                    reply = 404
                if isinstance(reply, tuple) and reply[0] == "sleep":
                    time.sleep(reply[1])
                    reply = reply[2]
                if isinstance(reply, int):
                    self.send_response(reply)
                    if reply == 429:
                        self.send_header("Retry-After", "0")
                    body = b'{"error": {"message": "scripted failure"}}'
                elif isinstance(reply, tuple) and reply[0] == "raw":
                    self.send_response(200)
                    body = reply[1]
                else:
                    self.send_response(200)
                    body = json.dumps({
                        "id": "chatcmpl-test", "object": "chat.completion", "created": 0,
                        "model": "fake-vlm",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": reply}}],
                    }).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # the client gave up (timeout tests)
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeVLM:  # noqa: PYI034 - Self needs Python 3.11
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
