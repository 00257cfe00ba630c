"""A stand-in for the Kubeflow Pipelines v2beta1 REST API, for tests of ``pipelines.kfp_client``.

A KFP API server cannot run here (it needs a cluster), so this is a small ``http.server`` on
127.0.0.1 that answers the few endpoints ``kfp.Client`` calls to upload pipelines and versions,
create experiments and runs and read a run's state, keeps what they create in memory, and
records every request (method, path, query, headers, body) for the tests to inspect. It is not
KFP: no validation of pipeline specs, no scheduling. A run's states come from ``run_states``,
one per read, the last one repeating; ``next_run_id`` fixes the id of the next run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

PREFIX = "/apis/v2beta1"
CREATED_AT = "2026-12-03T12:00:00Z"


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class KfpApiStandIn:
    """Start with :meth:`start`, point ``kfp.Client`` at :attr:`url`, stop with :meth:`stop`."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.run_states: list[str] = ["SUCCEEDED"]
        self.next_run_id: str | None = None  # set to choose the id of the next run
        self._reads: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> KfpApiStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port; a second call does nothing."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()

    def calls(self, method: str, path: str) -> list[Request]:
        """The recorded requests to ``path`` (below /apis/v2beta1) with ``method``."""
        return [r for r in self.requests if r.method == method and r.path == PREFIX + path]

    def next_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}"

    # -- the endpoints ----------------------------------------------------------------------

    def answer(self, request: Request) -> tuple[int, dict]:
        path = request.path.removeprefix(PREFIX)
        parts = path.strip("/").split("/")
        route = (request.method, *parts)
        if route == ("GET", "healthz"):
            return 200, {"multi_user": False}
        if route == ("GET", "pipelines"):
            found = _matching(self.pipelines.values(), request.query)
            return 200, {"pipelines": found, "total_size": len(found)}
        if route == ("POST", "pipelines", "upload"):
            return 200, self._new_pipeline(request.query["name"])
        if route == ("POST", "pipelines", "upload_version"):
            pipeline_id = request.query["pipelineid"]
            if pipeline_id not in self.pipelines:
                return 404, {"message": f"pipeline {pipeline_id} not found"}
            return 200, self._new_version(pipeline_id, request.query["name"])
        if request.method == "GET" and parts[0] == "pipelines" and parts[2:] == ["versions"]:
            versions = list(reversed(self.versions.get(parts[1], [])))  # newest first
            found = _matching(versions, request.query)
            size = int(request.query.get("page_size") or len(found) or 1)
            return 200, {"pipeline_versions": found[:size], "total_size": len(found)}
        if route == ("GET", "experiments"):
            found = _matching(self.experiments.values(), request.query)
            return 200, {"experiments": found, "total_size": len(found)}
        if route == ("POST", "experiments"):
            experiment = {**request.json(), "experiment_id": self.next_id("experiment")}
            self.experiments[experiment["experiment_id"]] = experiment
            return 200, experiment
        if route == ("POST", "runs"):
            run_id, self.next_run_id = self.next_run_id or self.next_id("run"), None
            run = {**request.json(), "run_id": run_id, "state": "PENDING"}
            self.runs[run["run_id"]] = run
            return 200, run
        if request.method == "GET" and parts[0] == "runs" and len(parts) == 2:
            if parts[1] not in self.runs:
                return 404, {"message": f"run {parts[1]} not found"}
            reads = self._reads[parts[1]] = self._reads.get(parts[1], -1) + 1
            state = self.run_states[min(reads, len(self.run_states) - 1)]
            return 200, {**self.runs[parts[1]], "state": state}
        return 404, {"message": f"the stand-in does not implement {request.method} {path}"}

    def _new_pipeline(self, name: str) -> dict:
        pipeline = {
            "pipeline_id": self.next_id("pipeline"),
            "display_name": name,
            "created_at": CREATED_AT,
        }
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        # KFP stores the uploaded file as the pipeline's first version, named like it
        self._new_version(pipeline["pipeline_id"], name)
        return pipeline

    def _new_version(self, pipeline_id: str, name: str) -> dict:
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": self.next_id("version"),
            "display_name": name,
            "created_at": CREATED_AT,
        }
        self.versions.setdefault(pipeline_id, []).append(version)
        return version


def _matching(items: Any, query: dict[str, str]) -> list[dict]:
    """Apply display_name EQUALS filters, the only kind these calls send.

    kfp.Client writes the operation as its enum number (1), pipelines.kfp_client as its name;
    the API accepts both, as protobuf JSON does.
    """
    items = list(items)
    if not query.get("filter"):
        return items
    wanted = {
        p["key"]: p["stringValue"]
        for p in json.loads(query["filter"])["predicates"]
        if p["operation"] in ("EQUALS", 1)
    }
    return [i for i in items if all(i.get(k) == v for k, v in wanted.items())]


def _handler(standin: KfpApiStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            request = Request(
                method=self.command,
                path=parts.path,
                query={k: v[0] for k, v in parse_qs(parts.query).items()},
                headers={k.lower(): v for k, v in self.headers.items()},
                body=self.rfile.read(length) if length else b"",
            )
            standin.requests.append(request)
            status, payload = standin.answer(request)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the requests are recorded; no access log on stderr

    return Handler
