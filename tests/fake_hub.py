"""A Hugging Face Hub on 127.0.0.1 for `surgery push` tests: the endpoints huggingface_hub's real
client calls to look up, create and commit to a model repository (every file goes inline, as the
Hub's preupload answer "regular" asks), with repositories kept in memory. Nothing leaves the machine.

`refuse` makes one endpoint answer an error (status, message), as the Hub does for a full quota or
a bad token; `drop` closes the connection of one endpoint without an answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=lambda: {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
    commits: list[str] = field(default_factory=list)  # their summaries


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, dict]] = field(default_factory=list)  # (method, path, JSON body or {})
    refuse: dict[str, tuple[int, str]] = field(default_factory=dict)  # endpoint name -> (status, message)
    drop: set[str] = field(default_factory=set)  # endpoint names whose connection is closed
    url: str = ""

    def serve(self) -> ThreadingHTTPServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub._handle(self, "GET")

            def do_POST(self):
                hub._handle(self, "POST")

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    # ------------------------------------------------------------ the endpoints

    def _handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        path = request.path.split("?")[0]
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        parsed = json.loads(body) if body and request.headers.get("Content-Type", "").startswith("application/json") else {}
        self.requests.append((method, path, parsed))
        routes = [("create", "POST", r"/api/repos/create"), ("validate", "POST", r"/api/validate-yaml"),
                  ("preupload", "POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/main"),
                  ("commit", "POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/main"),
                  ("info", "GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(/revision/main)?")]
        for name, verb, pattern in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                if name in self.drop:
                    request.close_connection = True
                    request.connection.shutdown(2)
                    return
                if name in self.refuse:
                    status, message = self.refuse[name]
                    return _answer(request, status, {"error": message})
                return getattr(self, f"_{name}")(request, parsed, body, match.groupdict().get("repo"))
        _answer(request, 404, {"error": f"no route {method} {path}"})

    def _info(self, request, parsed, body, repo_id):
        repo = self.repos.get(repo_id)
        if repo is None:
            return _answer(request, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        _answer(request, 200, {"id": repo_id, "private": repo.private, "sha": _sha(repo),
                               "siblings": [{"rfilename": name} for name in sorted(repo.files)]})

    def _create(self, request, parsed, body, _):
        repo_id = f"{parsed['organization']}/{parsed['name']}" if parsed.get("organization") else parsed["name"]
        if repo_id in self.repos:
            return _answer(request, 409, {"error": "You already created this model repo"})
        self.repos[repo_id] = Repo(private=parsed.get("visibility") == "private")  # the owner's default here: public
        _answer(request, 200, {"url": f"{self.url}/{repo_id}"})

    def _validate(self, request, parsed, body, _):
        _answer(request, 200, {"errors": [], "warnings": []})

    def _preupload(self, request, parsed, body, repo_id):
        _answer(request, 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in parsed["files"]]})

    def _commit(self, request, parsed, body, repo_id):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        repo = self.repos[repo_id]
        files = dict(repo.files)
        for line in lines:
            if line["key"] == "file":
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] == "deletedFile":
                files.pop(line["value"]["path"])
        repo.files = files  # all at once: a commit is atomic
        repo.commits.append(lines[0]["value"]["summary"])
        _answer(request, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{_sha(repo)}", "commitOid": _sha(repo),
                               "pullRequestUrl": None})


def _sha(repo: Repo) -> str:
    return hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in repo.files.items())).encode()).hexdigest()


def _answer(request: BaseHTTPRequestHandler, status: int, data: dict, headers: dict | None = None) -> None:
    payload = json.dumps(data).encode()
    request.send_response(status)
    request.send_header("Content-Type", "application/json")
    request.send_header("Content-Length", str(len(payload)))
    for key, value in (headers or {}).items():
        request.send_header(key, value)
    request.end_headers()
    request.wfile.write(payload)
