"""A loopback stand-in for the Hugging Face Hub's HTTP API — a TEST STAND-IN, not a Hub implementation.

Standard library only; repositories live on disk under ``root``. It serves what the genuine
`huggingface_hub` client calls for ``snapshot_download`` / ``hf_hub_download`` and for ``create_repo``,
``create_branch`` and ``upload_folder`` (``create_commit`` over the LFS "basic" transfer), so tests can run
pull → merge → push → pull over real HTTP with ``HF_ENDPOINT`` pointing here:

    GET       /api/{models|datasets}/{repo}[/revision/{rev}]        repo info (sha, siblings)
    GET       /api/{type}s/{repo}/tree/{rev}[/{path}]                tree listing (``recursive=1`` honoured)
    HEAD, GET /{repo}/resolve/{rev}/{path}, /datasets/{repo}/...     files, with X-Repo-Commit, ETag, X-Linked-*
    POST      /api/repos/create                                      409 when the repo exists
    POST      /api/{type}s/{repo}/branch/{branch}                    409 when the branch exists
    POST      /api/{type}s/{repo}/preupload/{rev}                    upload modes (binary or large files: lfs)
    POST      /{repo}.git/info/lfs/objects/batch (and /datasets/...) LFS batch: upload + verify actions
    PUT       /lfs-upload/{sha256}, POST /lfs-verify                 LFS basic transfer (sha256 checked)
    POST      /api/{type}s/{repo}/commit/{rev}[?create_pr=1]         NDJSON commit; PRs become refs/pr/N
    POST      /api/validate-yaml, GET /api/whoami-v2                 always fine

Errors are 404s with the ``X-Error-Code`` the client maps to its exceptions (RepoNotFound, RevisionNotFound,
EntryNotFound); writes without a bearer token get 401. Not covered: Xet storage (clients must set
``HF_HUB_DISABLE_XET=1``), multipart LFS, discussions, deletes of repos, permissions beyond "has a token".

Test hooks: ``fail_commits`` (answer 500 on every commit while set) and ``tokens_seen`` (every bearer token
received, so a test can show a token was used and then scan outputs for it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, unquote, urlparse

LFS_THRESHOLD = 10_000  # bytes; binary files always go through LFS

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_TYPE = r"(?P<type>models|datasets)"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandIn:
    """Repos on disk plus a threaded HTTP server on 127.0.0.1; use as a context manager."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "lfs").mkdir(exist_ok=True)
        self.fail_commits = False
        self.tokens_seen: set[str] = set()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "HubStandIn":
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- storage ----------------------------------------------------------------------------------------------

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / repo_type / repo_id

    def exists(self, repo_type: str, repo_id: str) -> bool:
        return (self.repo_dir(repo_type, repo_id) / "refs.json").is_file()

    def refs(self, repo_type: str, repo_id: str) -> dict:
        return json.loads((self.repo_dir(repo_type, repo_id) / "refs.json").read_text())

    def _write_refs(self, repo_type: str, repo_id: str, refs: dict) -> None:
        (self.repo_dir(repo_type, repo_id) / "refs.json").write_text(json.dumps(refs))

    def commit(self, repo_type: str, repo_id: str, oid: str) -> dict:
        return json.loads((self.repo_dir(repo_type, repo_id) / "commits" / f"{oid}.json").read_text())

    def resolve_revision(self, repo_type: str, repo_id: str, revision: str) -> Optional[str]:
        refs = self.refs(repo_type, repo_id)
        if revision in refs:
            return refs[revision]
        if (self.repo_dir(repo_type, repo_id) / "commits" / f"{revision}.json").is_file():
            return revision
        return None

    def blob(self, repo_type: str, repo_id: str, entry: dict) -> bytes:
        if entry["lfs"]:
            return (self.root / "lfs" / entry["sha256"]).read_bytes()
        return (self.repo_dir(repo_type, repo_id) / "blobs" / entry["blob"]).read_bytes()

    def create_repo(self, repo_type: str, repo_id: str, private: bool = False) -> bool:
        with self.lock:
            if self.exists(repo_type, repo_id):
                return False
            folder = self.repo_dir(repo_type, repo_id)
            (folder / "commits").mkdir(parents=True, exist_ok=True)
            (folder / "blobs").mkdir(exist_ok=True)
            (folder / "meta.json").write_text(json.dumps({"private": private}))
            self._write_refs(repo_type, repo_id, {})
            oid = self._store_commit(repo_type, repo_id, None, "initial commit", {})
            self._write_refs(repo_type, repo_id, {"main": oid})
            return True

    def _store_commit(self, repo_type: str, repo_id: str, parent: Optional[str], message: str, files: dict) -> str:
        body = {"parent": parent, "message": message, "files": files, "time": time.time()}
        oid = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        (self.repo_dir(repo_type, repo_id) / "commits" / f"{oid}.json").write_text(json.dumps(body))
        return oid

    def apply_commit(self, repo_type: str, repo_id: str, revision: str, lines: list[dict], create_pr: bool) -> dict:
        with self.lock:
            refs = self.refs(repo_type, repo_id)
            if revision not in refs and self.resolve_revision(repo_type, repo_id, revision) is None:
                raise LookupError(revision)
            parent = refs.get(revision) or revision
            files = dict(self.commit(repo_type, repo_id, parent)["files"])
            message = ""
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    message = value.get("summary", "")
                elif key == "file":
                    data = base64.b64decode(value["content"])
                    blob = git_blob_id(data)
                    (self.repo_dir(repo_type, repo_id) / "blobs" / blob).write_bytes(data)
                    files[value["path"]] = {"blob": blob, "size": len(data), "lfs": False}
                elif key == "lfsFile":
                    if not (self.root / "lfs" / value["oid"]).is_file():
                        raise ValueError(f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = {"blob": git_blob_id(_pointer(value["oid"], value["size"])),
                                            "sha256": value["oid"], "size": value["size"], "lfs": True}
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(prefix)}
            oid = self._store_commit(repo_type, repo_id, parent, message, files)
            out = {"commitOid": oid, "success": True}
            if create_pr:
                number = 1 + sum(1 for r in refs if r.startswith("refs/pr/"))
                refs[f"refs/pr/{number}"] = oid
                out["pullRequestUrl"] = f"{self.web_url(repo_type, repo_id)}/discussions/{number}"
            else:
                refs[revision] = oid
            self._write_refs(repo_type, repo_id, refs)
            out["commitUrl"] = f"{self.web_url(repo_type, repo_id)}/commit/{oid}"
            return out

    def web_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.url}/{'datasets/' if repo_type == 'datasets' else ''}{repo_id}"

    def files_at(self, repo_type: str, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Every file of a revision (for tests that inspect what was pushed)."""
        oid = self.resolve_revision(repo_type, repo_id, revision)
        files = self.commit(repo_type, repo_id, oid)["files"]
        return {path: self.blob(repo_type, repo_id, entry) for path, entry in files.items()}

    # --- HTTP -------------------------------------------------------------------------------------------------

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            # routing
            def do_GET(self) -> None:
                self._route("GET")

            def do_HEAD(self) -> None:
                self._route("HEAD")

            def do_POST(self) -> None:
                self._route("POST")

            def do_PUT(self) -> None:
                self._route("PUT")

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                path = url.path
                auth = self.headers.get("Authorization", "")
                self.token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
                if self.token:
                    hub.tokens_seen.add(self.token)
                self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) \
                    if method in ("POST", "PUT") else b""
                routes = [
                    ("GET", r"/api/whoami-v2", self.whoami),
                    ("POST", r"/api/validate-yaml", lambda: self.send_json({"errors": [], "warnings": []})),
                    ("POST", r"/api/repos/create", self.create_repo),
                    ("GET", rf"/api/{_TYPE}/{_REPO}(?:/revision/(?P<rev>.+))?", self.repo_info),
                    ("GET", rf"/api/{_TYPE}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self.tree),
                    ("POST", rf"/api/{_TYPE}/{_REPO}/branch/(?P<branch>.+)", self.create_branch),
                    ("POST", rf"/api/{_TYPE}/{_REPO}/preupload/(?P<rev>.+)", self.preupload),
                    ("POST", rf"/api/{_TYPE}/{_REPO}/commit/(?P<rev>.+)", self.do_commit),
                    ("POST", rf"/(?:datasets/)?{_REPO}\.git/info/lfs/objects/batch", self.lfs_batch),
                    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.lfs_upload),
                    ("POST", r"/lfs-verify", self.lfs_verify),
                    ("GET", rf"/(?P<ds>datasets/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
                    ("HEAD", rf"/(?P<ds>datasets/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
                ]
                for verb, pattern, handler in routes:
                    if verb != method:
                        continue
                    match = re.fullmatch(pattern, path)
                    if match:
                        self.params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                        try:
                            handler()
                        except Exception as err:  # a stand-in bug must show, not hang the client
                            self.send_json({"error": f"stand-in error: {err!r}"}, 500)
                        return
                self.send_json({"error": f"not covered by the stand-in: {method} {path}"}, 404)

            # helpers
            def send_json(self, payload, status: int = 200, headers: Optional[dict] = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def not_found(self, code: str, message: str) -> None:
                self.send_json({"error": message}, 404, {"X-Error-Code": code, "X-Error-Message": message})

            def repo_type(self) -> str:
                return self.params.get("type") or ("datasets" if self.params.get("ds") else "models")

            def need_repo(self) -> bool:
                repo_type, repo = self.repo_type(), self.params["repo"]
                if not hub.exists(repo_type, repo):
                    self.not_found("RepoNotFound", f"Repository Not Found for url: {self.path}.")
                    return False
                meta = json.loads((hub.repo_dir(repo_type, repo) / "meta.json").read_text())
                if meta.get("private") and not self.token:
                    self.not_found("RepoNotFound", "Repository Not Found (private, no token).")
                    return False
                return True

            def need_token(self) -> bool:
                if not self.token:
                    self.send_json({"error": "Invalid credentials in Authorization header"}, 401)
                    return False
                return True

            def revision_oid(self) -> Optional[str]:
                oid = hub.resolve_revision(self.repo_type(), self.params["repo"], self.params.get("rev", "main"))
                if oid is None:
                    self.not_found("RevisionNotFound", f"Invalid rev id: {self.params.get('rev')}")
                return oid

            # endpoints
            def whoami(self) -> None:
                if self.need_token():
                    self.send_json({"type": "user", "name": "tester", "orgs": [],
                                    "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

            def create_repo(self) -> None:
                if not self.need_token():
                    return
                payload = json.loads(self.body)
                repo = f"{payload.get('organization') or 'tester'}/{payload['name']}"
                repo_type = (payload.get("type") or "model") + "s"
                created = hub.create_repo(repo_type, repo, private=payload.get("visibility") == "private"
                                          or bool(payload.get("private")))
                url = hub.web_url(repo_type, repo)
                if created:
                    self.send_json({"url": url, "name": repo})
                else:
                    self.send_json({"error": "You already created this repo", "url": url}, 409)

            def repo_info(self) -> None:
                if not self.need_repo():
                    return
                oid = self.revision_oid()
                if oid is None:
                    return
                repo = self.params["repo"]
                files = hub.commit(self.repo_type(), repo, oid)["files"]
                self.send_json({
                    "id": repo, "modelId": repo, "sha": oid, "private": False, "disabled": False,
                    "siblings": [{"rfilename": p} for p in sorted(files)], "tags": [], "downloads": 0, "likes": 0,
                    "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
                })

            def tree(self) -> None:
                if not self.need_repo():
                    return
                oid = self.revision_oid()
                if oid is None:
                    return
                prefix = self.params.get("path", "").strip("/")
                recursive = self.query.get("recursive", "").lower() in ("1", "true")
                files = hub.commit(self.repo_type(), self.params["repo"], oid)["files"]
                entries, dirs = [], set()
                for path, entry in sorted(files.items()):
                    if prefix and not path.startswith(prefix + "/"):
                        continue
                    rest = path[len(prefix) + 1:] if prefix else path
                    parts = rest.split("/")
                    for i in range(1, len(parts)):
                        d = "/".join(([prefix] if prefix else []) + parts[:i])
                        if (recursive or i == 1) and d not in dirs:
                            dirs.add(d)
                            entries.append({"type": "directory", "oid": git_blob_id(d.encode()), "size": 0, "path": d})
                    if not recursive and len(parts) > 1:
                        continue
                    item = {"type": "file", "oid": entry["blob"], "size": entry["size"], "path": path}
                    if entry["lfs"]:
                        item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": 134}
                    entries.append(item)
                self.send_json(entries)

            def resolve(self) -> None:
                if not self.need_repo():
                    return
                oid = self.revision_oid()
                if oid is None:
                    return
                repo_type, repo = self.repo_type(), self.params["repo"]
                entry = hub.commit(repo_type, repo, oid)["files"].get(self.params["path"])
                if entry is None:
                    self.not_found("EntryNotFound", f"{self.params['path']} does not exist at {oid}")
                    return
                data = hub.blob(repo_type, repo, entry)
                etag = entry["sha256"] if entry["lfs"] else entry["blob"]
                status, start, end = 200, 0, len(data)
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if match:
                    status, start = 206, int(match.group(1))
                    end = int(match.group(2)) + 1 if match.group(2) else len(data)
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(end - start))
                self.send_header("X-Repo-Commit", oid)
                self.send_header("ETag", f'"{etag}"')
                if entry["lfs"]:
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data[start:end])

            def create_branch(self) -> None:
                if not (self.need_token() and self.need_repo()):
                    return
                repo_type, repo = self.repo_type(), self.params["repo"]
                payload = json.loads(self.body or b"{}")
                with hub.lock:
                    refs = hub.refs(repo_type, repo)
                    if self.params["branch"] in refs:
                        self.send_json({"error": "Reference already exists"}, 409)
                        return
                    start = hub.resolve_revision(repo_type, repo, payload.get("startingPoint") or "main")
                    refs[self.params["branch"]] = start
                    hub._write_refs(repo_type, repo, refs)
                self.send_json({})

            def preupload(self) -> None:
                if not (self.need_token() and self.need_repo()):
                    return
                files = json.loads(self.body)["files"]
                out = []
                for f in files:
                    sample = base64.b64decode(f["sample"])
                    lfs = f["size"] > LFS_THRESHOLD or b"\0" in sample
                    out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                                "shouldIgnore": False, "oid": None})
                self.send_json({"files": out, "commitOid": None})

            def lfs_batch(self) -> None:
                if not self.need_token():
                    return
                payload = json.loads(self.body)
                objects = []
                for obj in payload["objects"]:
                    item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                    if not (hub.root / "lfs" / obj["oid"]).is_file():
                        item["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"},
                                           "verify": {"href": f"{hub.url}/lfs-verify"}}
                    objects.append(item)
                self.send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

            def lfs_upload(self) -> None:
                oid = self.params["oid"]
                if hashlib.sha256(self.body).hexdigest() != oid:
                    self.send_json({"error": "sha256 mismatch"}, 400)
                    return
                (hub.root / "lfs" / oid).write_bytes(self.body)
                self.send_json({})

            def lfs_verify(self) -> None:
                payload = json.loads(self.body)
                stored = hub.root / "lfs" / payload["oid"]
                ok = stored.is_file() and stored.stat().st_size == payload["size"]
                self.send_json({} if ok else {"error": "not uploaded"}, 200 if ok else 404)

            def do_commit(self) -> None:
                if not (self.need_token() and self.need_repo()):
                    return
                if hub.fail_commits:
                    self.send_json({"error": "Internal Error - simulated by the test stand-in"}, 500)
                    return
                lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
                try:
                    out = hub.apply_commit(self.repo_type(), self.params["repo"], self.params["rev"], lines,
                                           self.query.get("create_pr") == "1")
                except LookupError:
                    self.not_found("RevisionNotFound", f"Invalid rev id: {self.params['rev']}")
                    return
                except ValueError as err:
                    self.send_json({"error": str(err)}, 400)
                    return
                self.send_json(out)

        return Handler


def _pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()
