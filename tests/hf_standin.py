"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for download tests without the internet.

It serves what ``huggingface_hub`` asks for when downloading files into a ``local_dir``: the repository
listing with file sizes (``GET /api/models/<repo>``), file metadata (``HEAD /<repo>/resolve/<rev>/<file>``)
and file contents (``GET``, with ``Range`` for resumed downloads). Gated repositories answer 403 with
``X-Error-Code: GatedRepo`` unless the request carries the accepted token. ``cut = (file, n)`` simulates a
connection that breaks: the next GET of that file sends only n bytes, and from then on every request fails
with 503 until ``down`` is cleared (the network is down). Every request is recorded.
"""

import hashlib
import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_granted"  # the token that has access to the gated repositories


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def repos() -> dict[str, dict[str, bytes]]:
    """Small stand-ins of the repositories the distilled text-to-video workflow needs, in their published
    layouts (plus files that must not be fetched: other DiTs, T5-Gemma's decoder shard, READMEs)."""
    index = {"weight_map": {"model.encoder.a": "model-00001-of-00002.safetensors",
                            "model.decoder.b": "model-00002-of-00002.safetensors"}}  # fmt: skip
    return {
        "SanDiegoDude/daVinci-MagiHuman-FP8": {
            "distill_fp8/model.safetensors.index.json": b'{"weight_map": {}}',
            "distill_fp8/model-00001-of-00001.safetensors": blob(1_000_000, 1),
            "base_fp8/model-00001-of-00001.safetensors": blob(1000, 2),
            "README.md": b"# FP8",
        },
        "google/t5gemma-9b-9b-ul2": {
            "config.json": b"{}",
            "tokenizer.json": b"{}",
            "tokenizer_config.json": b"{}",
            "special_tokens_map.json": b"{}",
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-00001-of-00002.safetensors": blob(5000, 3),
            "model-00002-of-00002.safetensors": blob(5000, 4),
        },
        "GAIR/daVinci-MagiHuman": {
            "turbo_vae/TurboV3-Wan22-TinyShallow_7_7.json": b"{}",
            "turbo_vae/checkpoint-340000.ckpt": blob(3000, 5),
            "distill/model.safetensors": blob(1000, 6),
        },
        "stabilityai/stable-audio-open-1.0": {
            "model.safetensors": blob(4000, 7),
            "model_config.json": b"{}",
            "README.md": b"# SAO",
        },
    }


GATED = {"google/t5gemma-9b-9b-ul2": TOKEN, "stabilityai/stable-audio-open-1.0": TOKEN}


class HubStandIn:
    def __init__(self, repos: dict[str, dict[str, bytes]], gated: dict[str, str] | None = None):
        """``repos``: {repo id: {file name: content}}; ``gated``: {repo id: the token that has access}."""
        self.repos, self.gated = repos, gated or {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.cut: tuple[str, int] | None = None
        self.down = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def file_gets(self, name: str) -> list[str | None]:
        """The Range header of every GET of a file named ``name`` (None: the whole file)."""
        return [r for method, path, r in self.requests if method == "GET" and path.endswith("/" + name)]


def _handler(hub: HubStandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):  # noqa: N802 - http.server's naming
            self._serve(body=False)

        def do_GET(self):  # noqa: N802
            self._serve(body=True)

        def _send(self, status: int, headers: dict, body: bytes = b"") -> None:
            self.send_response(status)
            for key, value in (headers | {"Content-Length": str(len(body))}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self._send(status, {"X-Error-Code": code, "X-Error-Message": message}, body)

        def _serve(self, body: bool) -> None:
            path = self.path.split("?")[0]
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if hub.down:
                return self._error(503, "ServiceUnavailable", "the network is down")
            info = re.fullmatch(r"/api/models/(.+?/.+?)(?:/revision/[^/]+)?", path)
            file = re.fullmatch(r"/(.+?/.+?)/resolve/[^/]+/(.+)", path)
            repo = (info or file).group(1) if (info or file) else None
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo} not found")
            if repo in hub.gated and self.headers.get("Authorization") != f"Bearer {hub.gated[repo]}":
                return self._error(403, "GatedRepo", f"Access to model {repo} is restricted.")
            files = hub.repos[repo]
            if info:
                siblings = [{"rfilename": n, "size": len(c)} for n, c in files.items()]
                return self._send(200, {"Content-Type": "application/json"}, json.dumps(
                    {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings}
                ).encode())  # fmt: skip
            name = file.group(2)
            if name not in files:
                return self._error(404, "EntryNotFound", f"{name} is not in {repo}")
            self._file(name, files[name], body)

        def _file(self, name: str, content: bytes, body: bool) -> None:
            headers = {
                "X-Repo-Commit": COMMIT,
                "ETag": '"' + hashlib.sha256(content).hexdigest() + '"',
                "Accept-Ranges": "bytes",
            }
            start, status = 0, 200
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and body:
                start, status = int(match.group(1)), 206
                headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            part = content[start:]
            if not body:
                self.send_response(200)
                for key, value in (headers | {"Content-Length": str(len(content))}).items():
                    self.send_header(key, value)
                return self.end_headers()
            if hub.cut and hub.cut[0] == name:  # send the start, then break the connection
                self.send_response(status)
                for key, value in (headers | {"Content-Length": str(len(part))}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(part[: hub.cut[1]])
                self.wfile.flush()
                hub.cut, hub.down = None, True
                self.close_connection = True
                return
            self._send(status, headers, part)

    return Handler
