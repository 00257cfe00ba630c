"""A stand-in for the few Kubernetes API calls the launcher makes; NOT a Kubernetes API server.

A real API server with the Kubeflow Trainer or training-operator CRDs cannot run here, so the
launcher's client is tested against this small ``http.server`` on 127.0.0.1. It keeps custom
objects in a dict, answers GET, POST (201, or 409 when the name is taken) and DELETE the way the
API server does for these paths, checks the bearer token, and records every request so a test
can assert what the launcher sent. It does not run jobs: each GET of a job returns the next
status from a script the test gives, standing in for the controller that would set them.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_PATH = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/"
                   r"(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$")  # fmt: skip


@dataclass
class Recorded:
    method: str
    path: str
    body: Any
    authorization: str | None


@dataclass
class StandIn:
    """State of the stand-in; tests read ``requests`` and set ``script`` and the knobs."""

    token: str
    url: str = ""
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    # status dicts handed out one per GET of a job (the last one repeats)
    script: list[dict[str, Any]] = field(default_factory=list)
    # answer the next POST with 409 and create the object as if another launcher had won
    conflict_on_create: bool = False
    # HTTP statuses to answer the next GETs of a job with (a flaky API server), first first
    get_errors: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _served: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def calls(self, method: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method]

    def put(self, namespace: str, plural: str, manifest: dict[str, Any], created=None) -> None:
        """Store an object as if someone had created it earlier (a restarted launcher's job)."""
        obj = json.loads(json.dumps(manifest))
        stamp = created or datetime.now(timezone.utc)
        obj["metadata"]["creationTimestamp"] = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
        obj["metadata"]["namespace"] = namespace
        self.objects[(namespace, plural, obj["metadata"]["name"])] = obj

    def next_status(self, key: tuple[str, str, str]) -> dict[str, Any]:
        if not self.script:
            return {}
        served = self._served.get(key, 0)
        self._served[key] = served + 1
        return self.script[min(served, len(self.script) - 1)]


def _handler(state: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length)) if length else None

        def _send(self, code: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _status(self, code: int, reason: str, message: str) -> None:
            self._send(
                code,
                {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                 "reason": reason, "message": message},
            )  # fmt: skip

        def _handle(self, method: str) -> None:
            body = self._body()
            auth = self.headers.get("Authorization")
            with state.lock:
                state.requests.append(Recorded(method, self.path, body, auth))
                if auth != f"Bearer {state.token}":
                    return self._status(401, "Unauthorized", "Unauthorized")
                match = _PATH.match(self.path)
                if not match:
                    return self._status(404, "NotFound", f"no route for {self.path}")
                key = (match["ns"], match["plural"], match["name"] or "")
                if method == "GET" and match["name"] and state.get_errors:
                    code = state.get_errors.pop(0)
                    return self._status(code, "ServiceUnavailable", "try again later")
                if method == "GET" and match["name"]:
                    obj = state.objects.get(key)
                    if obj is None:
                        return self._status(404, "NotFound", f"{key[1]} {key[2]} not found")
                    status = state.next_status(key)
                    if status:
                        obj["status"] = status
                    return self._send(200, obj)
                if method == "POST" and not match["name"]:
                    name = body["metadata"]["name"]
                    key = (match["ns"], match["plural"], name)
                    if state.conflict_on_create:
                        state.conflict_on_create = False
                        state.put(match["ns"], match["plural"], body)
                    if key in state.objects:
                        return self._status(409, "AlreadyExists", f"{name} already exists")
                    state.put(match["ns"], match["plural"], body)
                    return self._send(201, state.objects[key])
                if method == "DELETE" and match["name"]:
                    if state.objects.pop(key, None) is None:
                        return self._status(404, "NotFound", f"{key[2]} not found")
                    return self._send(200, {"kind": "Status", "status": "Success"})
                return self._status(405, "MethodNotAllowed", f"{method} {self.path}")

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_DELETE(self) -> None:
            self._handle("DELETE")

    return Handler


@contextmanager
def serve(token: str = "standin-token") -> Iterator[StandIn]:
    """Run the stand-in on a free port of 127.0.0.1 for the duration of the block."""
    state = StandIn(token=token)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
