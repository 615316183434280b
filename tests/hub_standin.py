"""A local stand-in for the Hugging Face Hub's HTTP API: just the endpoints huggingface_hub 2.4 calls to create a
repo, commit regular (base64) files, describe a repo and list its tree, and resolve files (HEAD + GET), with repos
kept in memory. No network: it listens on 127.0.0.1. Point huggingface_hub at it with ``HF_ENDPOINT=standin.url``.

Every file is answered "regular" at preupload (so nothing goes through LFS or Xet), and no response carries an
Xet header (so downloads are plain GETs).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def git_blob_id(content: bytes) -> str:
    """The git object id of a file's bytes (what the hub's tree lists as ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    private: bool
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    """(commit id, {path: bytes}) oldest first; the last one is main."""

    @property
    def head(self) -> tuple[str, dict[str, bytes]]:
        return self.commits[-1]

    def files_at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision == "main":
            return self.head
        return next((commit for commit in self.commits if commit[0] == revision), None)


class HubStandIn:
    """``with HubStandIn(token="hf_x") as hub:`` serves at ``hub.url``; ``hub.repos`` maps "org/name" to its Repo,
    ``hub.requests`` lists every "METHOD path" it answered, ``hub.unserved`` those it has no endpoint for."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self.unserved: list[str] = []
        self.drop_commits = False
        """True: close the connection on every commit without answering (a connection lost mid-upload)."""
        self._commits = 0
        self._lock = threading.Lock()
        standin = self

        class Handler(_Handler):
            hub = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The files of the repo's main branch."""
        return self.repos[repo_id].head[1]

    def new_commit(self, repo: Repo, files: dict[str, bytes]) -> str:
        with self._lock:
            self._commits += 1
            sha = hashlib.sha1(f"commit {self._commits}".encode()).hexdigest()
            repo.commits.append((sha, files))
        return sha

    def authorised(self, header: str | None) -> bool:
        return header == f"Bearer {self.token}"


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # ------------------------------------------------------------------ plumbing

    def _reply(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None, head: bool = False) -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None = None, message: str = "", head: bool = False, headers: dict | None = None):
        extra = {**({"X-Error-Code": code} if code else {}), **({"X-Error-Message": message} if message else {}), **(headers or {})}
        self._reply(status, {"error": message or code or "error"}, extra, head=head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _readable(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self.hub.authorised(self.headers.get("Authorization"))):
            return None
        return repo

    def _route(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.hub.requests.append(f"{method} {path}")
        head = method == "HEAD"
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo()
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml()
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
            return self._preupload(m[1])
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
            return self._commit(m[1], m[2])
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            return self._repo_info(m[1], m[2] or "main")
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
            return self._tree(m[1], m[2], m[3] or "", query)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(m[1], m[2], m[3], head)
        if method == "GET" and path == "/api/agent-harnesses":
            # huggingface_hub's best-effort lookup of AI-agent environments (where such variables are set): "none known"
            return self._error(404, message="no registry here")
        self.hub.unserved.append(f"{method} {path}")
        self._error(404, message=f"the stand-in does not serve {method} {path}", head=head)

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    # ------------------------------------------------------------------ endpoints

    def _create_repo(self):
        payload = json.loads(self._body())
        if not self.hub.authorised(self.headers.get("Authorization")):
            return self._error(401, message="Invalid credentials in Authorization header")
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._reply(409, {"error": "You already created this model repo", "url": url})
        repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self.hub.repos[repo_id] = repo
        self.hub.new_commit(repo, {})
        self._reply(200, {"url": url, "name": repo_id})

    def _validate_yaml(self):
        content = json.loads(self._body())["content"]
        front = re.match(r"---\n(.*?)\n---\n", content, re.S)
        try:
            metadata = yaml.safe_load(front[1]) if front else None
            assert front is None or isinstance(metadata, dict), "the front matter is not a mapping"
        except (yaml.YAMLError, AssertionError) as exc:
            return self._reply(400, {"errors": [{"message": str(exc)}], "warnings": []})
        self._reply(200, {"errors": [], "warnings": []})

    def _writable(self, repo_id: str) -> Repo | None:
        if not self.hub.authorised(self.headers.get("Authorization")):
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _preupload(self, repo_id: str):
        payload = json.loads(self._body())
        if self._writable(repo_id) is None:
            return
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in payload["files"]]
        self._reply(200, {"files": files, "commitOid": self.hub.repos[repo_id].head[0]})

    def _commit(self, repo_id: str, revision: str):
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        repo = self._writable(repo_id)
        if repo is None:
            return
        if self.hub.drop_commits:
            self.close_connection = True
            return
        if revision != "main":
            return self._error(404, "RevisionNotFound", "the stand-in commits to main only")
        files = dict(repo.head[1])
        for line in lines:
            if line["key"] == "file":
                assert line["value"]["encoding"] == "base64"
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] == "deletedFile":
                files.pop(line["value"]["path"], None)
            elif line["key"] != "header":
                return self._error(400, message=f"the stand-in takes regular files only, not {line['key']}")
        sha = self.hub.new_commit(repo, files)
        self._reply(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

    def _repo_info(self, repo_id: str, revision: str):
        repo = self._readable(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        commit = repo.files_at(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        sha, files = commit
        self._reply(200, {"id": repo_id, "sha": sha, "private": repo.private, "siblings": [{"rfilename": p} for p in sorted(files)]})

    def _tree(self, repo_id: str, revision: str, below: str, query: dict):
        repo = self._readable(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        commit = repo.files_at(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        prefix = f"{below.rstrip('/')}/" if below else ""
        entries = [{"type": "file", "path": path, "size": len(content), "oid": git_blob_id(content)}
                   for path, content in sorted(commit[1].items())
                   if path.startswith(prefix) and (recursive or "/" not in path[len(prefix):])]  # fmt: skip
        self._reply(200, entries)

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool):
        repo = self._readable(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found", head=head)
        commit = repo.files_at(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id", head=head)
        sha, files = commit
        if path not in files:
            return self._error(404, "EntryNotFound", "Entry not found", head=head, headers={"X-Repo-Commit": sha})
        content = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_id(content)}"', "Content-Type": "application/octet-stream"}
        self._reply(200, content, headers, head=head)
