"""A real ComfyUI server for the integration tests (see tests/COMFYUI.md): started from a checkout in a
temporary home that holds the pack (as a custom node) and the tiny demo models, talked to over HTTP."""

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


class PromptRejected(Exception):
    """The server refused a prompt (HTTP 400): ``error`` and per-node ``node_errors`` as it sent them."""

    def __init__(self, body: dict):
        super().__init__(json.dumps(body, indent=1)[:4000])
        self.body = body


class ComfyServer:
    def __init__(self, comfyui_dir: Path, python: str, home: Path, env: dict | None = None):
        self.home = home
        self.output = home / "output"
        self.log = home / "comfyui.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [
            python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
            "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
            "--output-directory", str(self.output), "--input-directory", str(home / "input"),
            "--user-directory", str(home / "user"),
            "--extra-model-paths-config", str(home / "extra_model_paths.yaml"),
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=comfyui_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {}),
            )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with {self.process.returncode}:\n{self.log_text()[-4000:]}"
                )
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def fetch(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return response.read()

    def get(self, path: str) -> dict:
        return json.loads(self.fetch(path))

    def post(self, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read()
        except urllib.error.HTTPError as e:
            if e.code == 400:
                raise PromptRejected(json.load(e)) from None
            raise
        return json.loads(text) if text else {}

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": "magihuman-tests"})["prompt_id"]

    def running(self) -> bool:
        return bool(self.get("/queue")["queue_running"])

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """The history entry of a finished prompt (``status.status_str`` "success" or "error")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry:  # written once the prompt has finished
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log_text()[-4000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")


def write_home(home: Path, pack: Path, models: Path) -> Path:
    """The server's temporary home: the pack under ``custom_nodes/ComfyUI-MagiHuman`` (a link), input and
    output folders, and an extra_model_paths.yaml pointing ComfyUI at them and at the models; ``downloads/``
    is the default models folder (first in each list: where downloads go, never the ComfyUI checkout)."""
    (home / "custom_nodes").mkdir(parents=True)
    (home / "custom_nodes" / "ComfyUI-MagiHuman").symlink_to(pack, target_is_directory=True)
    (home / "input").mkdir()
    (home / "user").mkdir()
    (home / "output").mkdir()
    (home / "extra_model_paths.yaml").write_text(
        "magihuman_tests:\n"
        f"  base_path: {home}\n"
        "  custom_nodes: custom_nodes\n"
        f"  diffusion_models: {models / 'diffusion_models'}\n"
        f"  vae: {models / 'vae'}\n"
        f"  text_encoders: {models / 'text_encoders'}\n"
        "magihuman_downloads:\n"
        f"  base_path: {home / 'downloads'}\n"
        "  is_default: true\n"
        "  diffusion_models: diffusion_models\n"
        "  vae: vae\n"
        "  text_encoders: text_encoders\n"
    )
    return home
