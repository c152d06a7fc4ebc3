"""A loopback server that answers the Hugging Face Hub's file endpoints as the real huggingface_hub client calls them.

`HEAD` and `GET /<org>/<name>/resolve/<revision>/<file>`, with the headers huggingface_hub reads
(file_download.get_hf_file_metadata / _get_metadata_or_catch_error): `X-Repo-Commit` (required), `ETag` (required;
for a file stored in git, not LFS, the git blob id, quoted), `Content-Length`. Errors carry the `X-Error-Code` header
that huggingface_hub.utils._http.hf_raise_for_status maps to its exceptions: `GatedRepo` (401 without a token that
may read the repo, 403 with another token), `RepoNotFound` (404), `RevisionNotFound` (404), `EntryNotFound` (404,
with `X-Repo-Commit`). A renamed repo answers 307 with a relative `Location`, as the Hub does. Every request is
recorded (method, path, Authorization header) for the tests to check what the client did.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    # revision name -> commit; "main" always exists. A 40-hex commit is accepted as itself.
    revisions: dict[str, str] = field(default_factory=dict)
    gated_token: str | None = None  # the one token that may read a gated repo
    moved_to: str | None = None  # a renamed repo: 307 to the new id

    def commit(self, revision: str) -> str | None:
        if revision in self.revisions:
            return self.revisions[revision]
        return revision if revision in self.revisions.values() else None


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None


class HubServer:
    """`url` is the HF_ENDPOINT to give the client; `repos` maps ORG/NAME to a Repo; `seen` lists the requests."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.seen: list[Seen] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, repo_id: str, files: dict[str, bytes | dict], **kw) -> Repo:
        data = {name: content if isinstance(content, bytes) else json.dumps(content, indent=2).encode()
                for name, content in files.items()}
        commit = hashlib.sha1(repo_id.encode() + b"".join(data.values())).hexdigest()
        repo = Repo(data, {"main": commit, **kw.pop("revisions", {})}, **kw)
        self.repos[repo_id] = repo
        return repo

    def requests_for(self, repo_id: str) -> list[Seen]:
        return [s for s in self.seen if s.path.startswith(f"/{repo_id}/")]

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _send(self, status: int, headers: dict[str, str], payload: bytes, body: bool) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if body and payload:
                    self.wfile.write(payload)

            def _error(self, status: int, code: str | None, message: str, body: bool, **extra: str) -> None:
                headers = {"Content-Type": "application/json", **extra}
                if code:
                    headers["X-Error-Code"] = code
                headers["X-Error-Message"] = message
                self._send(status, headers, json.dumps({"error": message}).encode(), body)

            def _answer(self, body: bool) -> None:
                path = unquote(self.path.split("?", 1)[0])
                hub.seen.append(Seen(self.command, path, self.headers.get("Authorization")))
                parts = path.lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, None, "Not Found", body)
                repo_id = "/".join(parts[:2])
                # The revision may hold slashes (refs/pr/1): the file name is the last part here (no subfolders).
                revision, filename = "/".join(parts[3:-1]), parts[-1]
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", "Repository not found", body)
                if repo.moved_to is not None:
                    location = f"/{repo.moved_to}/resolve/{revision}/{filename}"
                    return self._send(307, {"Location": location}, b"", body)
                if repo.gated_token is not None:
                    sent = self.headers.get("Authorization")
                    if sent is None:
                        return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must "
                                           "have access to it and be authenticated to access it. Please log in.",
                                           body)
                    if sent != f"Bearer {repo.gated_token}":
                        return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you "
                                           "are not in the authorized list.", body)
                commit = repo.commit(revision)
                if commit is None:
                    return self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, body)
                if filename not in repo.files:
                    return self._error(404, "EntryNotFound", "Entry not found", body, **{"X-Repo-Commit": commit})
                data = repo.files[filename]
                etag = f'"{git_blob_id(data)}"'
                self._send(200, {"ETag": etag, "X-Repo-Commit": commit, "Content-Type": "text/plain; charset=utf-8",
                                 "Accept-Ranges": "bytes"}, data, body)

        return Handler
