"""A small Hub-compatible HTTP server for tests: the real huggingface_hub client pushes to it and
transformers downloads from it, over HTTP on 127.0.0.1, with no Hub anywhere.

It answers what huggingface_hub 2.x sends for a push without Xet (HF_HUB_DISABLE_XET=1) and for a
download: whoami-v2, repo create, validate-yaml, preupload, commit (ndjson: inline base64 files,
lfsFile entries, deletions), the git-LFS batch API with a basic upload and its verify call, model
info, tree listing, and file resolve (GET/HEAD with the ETag / X-Repo-Commit / X-Linked-Etag headers
file_download reads). Repos live in memory, every commit as a snapshot.

    with FakeHub("hf_fake") as hub:
        env = {**os.environ, **hub.client_env()}  # for a subprocess: huggingface_hub reads it at import
        hub.refuse["someone-else"] = 403          # writes to that namespace answer 403
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

USER = "user"
# What the Hub's default .gitattributes sends to LFS (a subset: enough for model checkpoints).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".pkl", ".npy", ".zip")
DATE = "2025-01-01T00:00:00.000Z"


def git_blob_sha1(data):
    """The oid git gives a regular file (what the Hub returns as a file's ETag / blob id)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data):
    return hashlib.sha256(data).hexdigest()


@dataclass
class Commit:
    oid: str
    summary: str
    files: dict  # the whole tree after this commit: path -> bytes
    changed: list  # paths added or deleted by it


@dataclass
class Repo:
    repo_id: str
    private: bool
    lfs_paths: set = field(default_factory=set)
    commits: list = field(default_factory=list)

    @property
    def head(self):
        return self.commits[-1]

    def snapshot(self, revision):
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.oid == revision), None)


class HubError(Exception):
    """An HTTP error answer: status, message (body and X-Error-Message), X-Error-Code, extra body keys, headers."""

    def __init__(self, status, message, code=None, extra=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.extra, self.headers = extra or {}, headers or {}


class FakeHub:
    """State plus a ThreadingHTTPServer serving it; use as a context manager (start/stop)."""

    def __init__(self, token):
        self.token = token
        self.repos = {}
        self.lfs_store = {}  # sha256 -> bytes, filled by the LFS PUT
        self.create_calls = []  # the JSON body of every repo create call
        self.unhandled = []  # requests no route answered: the server lacks something the client needs
        self.refuse = {}  # namespace -> the HTTP status every write there answers with (e.g. 403)
        self.lock = threading.Lock()
        self.server = None

    # ---- lifecycle ----

    def __enter__(self):
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def client_env(self):
        return {"HF_ENDPOINT": self.url, "HF_TOKEN": self.token, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}

    # ---- what tests read ----

    def files(self, repo_id):
        return self.repos[repo_id].head.files

    def commit_summaries(self, repo_id):
        return [c.summary for c in self.repos[repo_id].commits]

    # ---- the API ----

    def _new_commit(self, repo, summary, files, changed):
        oid = hashlib.sha1(f"{repo.repo_id}:{len(repo.commits)}:{summary}".encode()).hexdigest()
        repo.commits.append(Commit(oid, summary, files, changed))
        return oid

    def whoami(self):
        return {"type": "user", "name": USER, "fullname": "Test User", "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}}

    def create_repo(self, body):
        self.create_calls.append(body)
        if body.get("type", "model") != "model":
            raise HubError(400, "this test server holds model repos only")
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            raise HubError(400, f"invalid repo name {repo_id}")
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", extra={"url": url})
        repo = Repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
        self._new_commit(repo, "initial commit", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                         [".gitattributes"])
        self.repos[repo_id] = repo
        return {"url": url, "name": repo_id}

    def repo(self, repo_id, authorized):
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(401 if not authorized else 404, "Repository not found", code="RepoNotFound")
        return repo

    def preupload(self, repo, revision, body):
        snapshot = self._snapshot(repo, revision)
        answers = []
        for item in body["files"]:
            path, size = item["path"], item["size"]
            lfs = path.endswith(LFS_SUFFIXES) or size > 10_000_000
            answer = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if path in snapshot.files:  # lets the client skip files that did not change
                data = snapshot.files[path]
                answer["oid"] = sha256(data) if path in repo.lfs_paths else git_blob_sha1(data)
            answers.append(answer)
        return {"files": answers, "commitOid": snapshot.oid}

    def lfs_batch(self, body):
        if body.get("operation") != "upload":
            raise HubError(400, "only uploads")
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], obj["size"]
            answer = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs_store:  # no actions: the content is already there
                answer["actions"] = {"upload": {"href": f"{self.url}/lfs-storage/{oid}", "header": {}},
                                     "verify": {"href": f"{self.url}/lfs-storage/{oid}/verify", "header": {}}}
            objects.append(answer)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_put(self, oid, data):
        if sha256(data) != oid:
            raise HubError(400, "uploaded content does not match its oid")
        self.lfs_store[oid] = data

    def lfs_verify(self, oid, body):
        if oid not in self.lfs_store or len(self.lfs_store[oid]) != body.get("size"):
            raise HubError(404, "object not uploaded")
        return {}

    def commit(self, repo, revision, lines):
        header, *operations = [json.loads(line) for line in lines if line.strip()]
        if header["key"] != "header":
            raise HubError(400, "the first ndjson line must be the header")
        files, changed = dict(self._snapshot(repo, revision).files), []
        for op in operations:
            key, value = op["key"], op["value"]
            path = value["path"]
            if key == "file":
                files[path] = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else \
                    value["content"].encode()
                repo.lfs_paths.discard(path)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_store:
                    raise HubError(400, f"LFS object {value['oid']} for {path} was never uploaded")
                files[path] = self.lfs_store[value["oid"]]
                repo.lfs_paths.add(path)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, "A file with this name doesn't exist", code="EntryNotFound")
            elif key == "deletedFolder":
                for name in [n for n in files if n.startswith(path.rstrip("/") + "/")]:
                    del files[name]
            else:
                raise HubError(400, f"unsupported commit operation {key}")
            changed.append(path)
        oid = self._new_commit(repo, header["value"]["summary"], files, changed)
        return {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}", "commitOid": oid, "success": True,
                "pullRequestUrl": None}

    def model_info(self, repo, revision):
        snapshot = self._snapshot(repo, revision)
        return {"id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                "sha": snapshot.oid, "private": repo.private, "disabled": False, "gated": False,
                "lastModified": DATE, "createdAt": DATE, "tags": [], "downloads": 0, "likes": 0,
                "siblings": [{"rfilename": path} for path in sorted(snapshot.files)]}

    def tree(self, repo, revision, prefix, recursive):
        snapshot, prefix = self._snapshot(repo, revision), prefix.strip("/")
        entries, folders = [], set()
        for path in sorted(snapshot.files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1:] if prefix else path
            if "/" in rest and not recursive:
                folders.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                continue
            entries.append(self._file_entry(repo, snapshot, path))
        entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
        if prefix and not entries:
            raise HubError(404, f"{prefix} not found", code="EntryNotFound")
        return entries

    def _file_entry(self, repo, snapshot, path):
        data = snapshot.files[path]
        entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        if path in repo.lfs_paths:
            entry["lfs"] = {"oid": sha256(data), "size": len(data), "pointerSize": 134}
        return entry

    def resolve(self, repo, revision, path):
        """(body, headers) of a file as the Hub serves it (LFS files directly, not through a CDN redirect)."""
        snapshot = self._snapshot(repo, revision)
        if path not in snapshot.files:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": snapshot.oid})
        data = snapshot.files[path]
        headers = {"X-Repo-Commit": snapshot.oid, "Content-Type": "application/octet-stream"}
        if path in repo.lfs_paths:
            headers.update({"ETag": f'"{sha256(data)}"', "X-Linked-Etag": f'"{sha256(data)}"',
                            "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{git_blob_sha1(data)}"'
        return data, headers

    def validate_yaml(self, body):
        match = re.match(r"^---\n(.*?)\n---\n", body.get("content", ""), re.S)
        if match is None:
            return {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as err:
            raise HubError(400, "Invalid YAML", extra={"errors": [{"message": str(err).splitlines()[0]}]})
        if not isinstance(metadata, dict):
            raise HubError(400, "Invalid YAML", extra={"errors": [{"message": "metadata must be a mapping"}]})
        return {"errors": [], "warnings": []}

    def _snapshot(self, repo, revision):
        snapshot = repo.snapshot(unquote(revision))
        if snapshot is None:
            raise HubError(404, f"Revision {revision} not found", code="RevisionNotFound")
        return snapshot


# Route table: (method, regex over the unquoted-per-segment path, handler name). Repo ids are two segments.
REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("GET", r"/api/whoami-v2", "_whoami"),
    ("GET", r"/api/agent-harnesses", "_agent_harnesses"),
    ("POST", r"/api/repos/create", "_create"),
    ("POST", r"/api/validate-yaml", "_validate_yaml"),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "_preupload"),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "_commit"),
    ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?P<path>/.*)?", "_tree"),
    ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", "_model_info"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "_lfs_batch"),
    ("PUT", r"/lfs-storage/(?P<oid>[0-9a-f]{64})", "_lfs_put"),
    ("POST", r"/lfs-storage/(?P<oid>[0-9a-f]{64})/verify", "_lfs_verify"),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve"),
    # Data sets and Spaces (e.g. evaluate's metric scripts): this Hub holds none.
    ("GET", r"/(?:api/)?(?:datasets|spaces)/.*", "_no_such_repo"),
    ("HEAD", r"/(?:api/)?(?:datasets|spaces)/.*", "_no_such_repo"),
    ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub = None
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; every response carries a Content-Length

    def log_message(self, *args):  # quiet: pytest shows failures, not every request
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # ---- plumbing ----

    def _dispatch(self, method):
        raw = urlsplit(self.path).path
        # Path segments are URL-quoted by the client (a revision or a path in a tree call): unquote each.
        path = "/".join(unquote(part) for part in raw.split("/"))
        self.body = self._read_body()
        for verb, pattern, name in ROUTES:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                try:
                    with self.hub.lock:
                        result = getattr(self, name)(**{k: v for k, v in match.groupdict().items()})
                except HubError as err:
                    self._error(err)
                    return
                self._send(*result) if isinstance(result, tuple) else self._json(200, result)
                return
        self.hub.unhandled.append(f"{method} {self.path}")
        self._error(HubError(404, f"no route for {method} {raw}"))

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self):
        return json.loads(self.body or b"{}")

    def _send(self, status, data, headers):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _json(self, status, payload, headers=None):
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, err):
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json(err.status, {"error": err.message, **err.extra}, headers)

    # ---- auth ----

    def _authorized(self):
        """True with the right bearer token, False without any; a wrong token is a 401 at once."""
        given = self.headers.get("Authorization")
        if given is None:
            return False
        if given != f"Bearer {self.hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def _writer(self, repo_id):
        if not self._authorized():
            raise HubError(401, "Invalid username or password.")
        status = self.hub.refuse.get(repo_id.split("/")[0])
        if status:
            raise HubError(status, f"You don't have the rights to create or write to {repo_id}")

    # ---- routes ----

    def _whoami(self):
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.whoami()

    def _agent_harnesses(self):  # the client's user-agent registry: none known here
        return {"standardEnvVars": [], "harnesses": {}}

    def _create(self):
        body = self._json_body()
        self._writer(f"{body.get('organization') or USER}/{body.get('name')}")
        return self.hub.create_repo(body)

    def _validate_yaml(self):
        return self.hub.validate_yaml(self._json_body())

    def _preupload(self, repo, rev):
        self._writer(repo)
        return self.hub.preupload(self.hub.repo(repo, True), rev, self._json_body())

    def _commit(self, repo, rev):
        self._writer(repo)
        return self.hub.commit(self.hub.repo(repo, True), rev, self.body.decode().splitlines())

    def _tree(self, repo, rev, path=None):
        recursive = "recursive=true" in (urlsplit(self.path).query or "").lower()
        return self.hub.tree(self.hub.repo(repo, self._authorized()), rev, path or "", recursive)

    def _model_info(self, repo, rev=None):
        return self.hub.model_info(self.hub.repo(repo, self._authorized()), rev or "main")

    def _lfs_batch(self, repo):
        self._writer(repo)
        self.hub.repo(repo, True)
        return self.hub.lfs_batch(self._json_body())

    def _lfs_put(self, oid):  # a presigned storage URL: no Authorization header, as with S3
        self.hub.lfs_put(oid, self.body)
        return 200, b"", {}

    def _lfs_verify(self, oid):
        if not self._authorized():
            raise HubError(401, "Invalid username or password.")
        return self.hub.lfs_verify(oid, self._json_body())

    def _no_such_repo(self):
        raise HubError(404, "Repository not found", code="RepoNotFound")

    def _resolve(self, repo, rev, path):
        data, headers = self.hub.resolve(self.hub.repo(repo, self._authorized()), rev, path)
        return 200, data, headers
