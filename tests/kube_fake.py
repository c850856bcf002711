"""A tiny in-process Kubernetes API server for `fadrm watch` tests (there is no cluster here).

It speaks enough of the real HTTP API for the official ``kubernetes`` client
(``CustomObjectsApi``, ``CoreV1Api``) to work unmodified against it: namespaced custom
objects (list with label selectors, get, create, delete) and core Events. Like a real API
server it

* answers ``409 AlreadyExists`` when an object of that name exists (``generateName`` is
  supported), ``404 NotFound`` for a missing one;
* enforces RBAC: every request is checked against the rules of one Role bound to the
  caller in one namespace (verbs get/list/create/delete, apiGroups, resources,
  resourceNames), and anything not granted is ``403 Forbidden``, so the Role that
  k8s/base deploys is tested against what the code really calls.

The kubernetes client raises its own ``ApiException`` for these, exactly as with a real
cluster. Objects are plain dicts in :attr:`FakeKubeAPI.objects`; tests set ``status`` there
to play KubeRay.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

__all__ = ["FakeKubeAPI", "selector_matches"]


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Kubernetes equality-based label selectors: ``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class FakeKubeAPI:
    """Start with :meth:`start`; ``host`` is the base URL for a client Configuration."""

    def __init__(self, namespace: str, rules: list[dict]):
        self.namespace = namespace
        self.rules = rules
        # (group, plural, namespace) -> name -> object
        self.objects: dict[tuple[str, str, str], dict[str, dict]] = {}
        self.requests: list[tuple[str, str, str, str]] = []  # (verb, group, plural, name)
        self.denied: list[tuple[str, str, str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ----------------------------------------------------------------- helpers for tests

    def put(self, group: str, plural: str, obj: dict, namespace: str | None = None) -> dict:
        """Store ``obj`` as if it had been created (no RBAC check)."""
        obj = json.loads(json.dumps(obj))
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", namespace or self.namespace)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        self.objects.setdefault((group, plural, meta["namespace"]), {})[meta["name"]] = obj
        return obj

    def items(self, group: str, plural: str, namespace: str | None = None) -> dict[str, dict]:
        return self.objects.setdefault((group, plural, namespace or self.namespace), {})

    def client(self) -> tuple[Any, Any]:
        """``(CustomObjectsApi, CoreV1Api)`` of the official client, talking to this server."""
        from kubernetes import client

        conf = client.Configuration()
        conf.host = self.host
        conf.proxy = None
        api_client = client.ApiClient(conf)
        return client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)

    # ----------------------------------------------------------------- server

    @property
    def host(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeKubeAPI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}") if length else {}

            def _handle(self, method: str) -> None:
                code, body = fake._dispatch(method, self.path, self._body())
                self._send(code, body)

            def do_GET(self):  # noqa: N802
                self._handle("GET")

            def do_POST(self):  # noqa: N802
                self._handle("POST")

            def do_DELETE(self):  # noqa: N802
                self._handle("DELETE")

            def do_PUT(self):  # noqa: N802
                self._handle("PUT")

            def do_PATCH(self):  # noqa: N802
                self._handle("PATCH")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- API

    def allowed(self, verb: str, group: str, plural: str, namespace: str, name: str) -> bool:
        if namespace != self.namespace:
            return False  # a Role grants nothing outside its namespace
        for rule in self.rules:
            if (group in rule.get("apiGroups", []) and plural in rule.get("resources", [])
                    and (verb in rule.get("verbs", []) or "*" in rule.get("verbs", []))):
                names = rule.get("resourceNames")
                # resourceNames can only authorize requests that name an object.
                if not names or (name and name in names):
                    return True
        return False

    def _dispatch(self, method: str, path: str, body: dict) -> tuple[int, dict]:
        url = urlparse(path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        # /apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}]  or  /api/v1/namespaces/...
        if parts[:1] == ["apis"] and len(parts) >= 6 and parts[3] == "namespaces":
            group, ns, plural, rest = parts[1], parts[4], parts[5], parts[6:]
        elif parts[:2] == ["api", "v1"] and len(parts) >= 5 and parts[2] == "namespaces":
            group, ns, plural, rest = "", parts[3], parts[4], parts[5:]
        else:
            return 404, _status(404, "NotFound", f"the server could not find {url.path}")
        name = rest[0] if rest else ""
        if method == "GET":
            verb = "get" if name else "list"
        elif method == "POST" and not name:
            verb = "create"
        elif method == "DELETE" and name:
            verb = "delete"
        elif method in ("PUT", "PATCH") and name:
            verb = "update" if method == "PUT" else "patch"
        else:
            return 405, _status(405, "MethodNotAllowed", f"{method} {url.path}")
        with self._lock:
            self.requests.append((verb, group, plural, name))
            if not self.allowed(verb, group, plural, ns, name):
                self.denied.append((verb, group, plural, name))
                what = f"{plural}.{group}" if group else plural
                return 403, _status(403, "Forbidden", (
                    f'{what} "{name}" is forbidden: User "system:serviceaccount:{ns}:'
                    f'fadrm-watch" cannot {verb} resource "{plural}" in API group '
                    f'"{group}" in the namespace "{ns}"'))
            store = self.objects.setdefault((group, plural, ns), {})
            if verb == "list":
                selector = query.get("labelSelector", "")
                items = [o for o in store.values()
                         if selector_matches(selector, o["metadata"].get("labels") or {})]
                return 200, {"apiVersion": "v1", "kind": "List", "items": items,
                             "metadata": {"resourceVersion": "1"}}
            if verb == "get":
                if name not in store:
                    return 404, _status(404, "NotFound", f'{plural} "{name}" not found')
                return 200, store[name]
            if verb == "delete":
                if name not in store:
                    return 404, _status(404, "NotFound", f'{plural} "{name}" not found')
                del store[name]
                return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
            if verb == "create":
                meta = body.setdefault("metadata", {})
                if not meta.get("name"):
                    if not meta.get("generateName"):
                        return 422, _status(422, "Invalid", "name or generateName is required")
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                if meta.get("namespace", ns) != ns:
                    return 400, _status(400, "BadRequest", "namespace does not match")
                if meta["name"] in store:
                    return 409, _status(409, "AlreadyExists",
                                        f'{plural} "{meta["name"]}" already exists')
                meta.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now(),
                            resourceVersion=str(len(self.requests)))
                store[meta["name"]] = body
                return 201, body
            return 405, _status(405, "MethodNotAllowed", verb)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
