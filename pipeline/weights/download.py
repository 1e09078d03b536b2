"""Fetching model files from Hugging Face into a ComfyUI models folder: a plan (pure, testable offline) and
its execution with ``huggingface_hub`` (resumable across runs, with progress, a token for gated repos)."""

import fnmatch
import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .catalogue import MODEL_FILES, WORKFLOW_FILES, WORKFLOW_SHORT_NAMES, ModelFile

TEXT_ENCODER_PREFIXES = (
    "encoder.",
    "model.encoder.",
)  # T5-Gemma keys the encoder reads; decoder shards are skipped


class DownloadError(RuntimeError):
    """A download that cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class Download:
    """One catalogue entry to fetch: which repository, which files, into which folder."""

    file: ModelFile
    target: Path  # local_dir handed to huggingface_hub

    @property
    def patterns(self) -> tuple[str, ...]:
        return self.file.patterns


def plan(names: list[str], models_dir: Path, folders: dict[str, Path] | None = None) -> list[Download]:
    """The downloads for catalogue entries ``names`` into ``models_dir`` (ComfyUI's ``models`` folder), or
    into ``folders`` ({ComfyUI folder name: path}, what ComfyUI itself has configured) where given."""
    unknown = [n for n in names if n not in MODEL_FILES]
    if unknown:
        raise DownloadError(f"unknown model file(s) {unknown}; known: {', '.join(MODEL_FILES)}")
    plans = []
    for name in dict.fromkeys(names):  # keep order, drop repeats
        entry = MODEL_FILES[name]
        folder = (folders or {}).get(entry.folder, models_dir / entry.folder)
        plans.append(Download(entry, folder / entry.subdir))
    return plans


def files_for(
    dits: list[str], srs: list[str], workflows: list[str], extra: list[str], everything: bool
) -> list[str]:
    """Catalogue names for the command line's choices (``--dit distill --sr 1080p --workflow ...``)."""
    if everything:
        return list(MODEL_FILES)
    workflows = [WORKFLOW_SHORT_NAMES.get(w, w) for w in workflows]
    unknown = [w for w in workflows if w not in WORKFLOW_FILES]
    if unknown:
        known = ", ".join(f"{short} ('{title}')" for short, title in WORKFLOW_SHORT_NAMES.items())
        raise DownloadError(f"unknown workflow(s) {unknown}; known: {known}")
    names = [f"dit_{d}" for d in dits] + [f"dit_sr_{s}" for s in srs]
    for workflow in workflows:
        names += WORKFLOW_FILES[workflow]
    return list(dict.fromkeys(names + extra))


def encoder_shards(index: dict) -> list[str]:
    """The shard files of a T5-Gemma index that hold encoder weights (the decoder's are never needed)."""
    shards = {shard for key, shard in index["weight_map"].items() if key.startswith(TEXT_ENCODER_PREFIXES)}
    if not shards:
        raise DownloadError("the T5-Gemma index lists no encoder weights; is this the right repository?")
    return sorted(shards)


def _hub():
    import huggingface_hub
    import huggingface_hub.errors  # noqa: F401  (a submodule: not loaded by the package itself)

    return huggingface_hub


def _unreachable(error: Exception) -> bool:
    """A transport failure of whichever HTTP client huggingface_hub uses (requests or httpx)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"ConnectionError", "ConnectError", "NetworkError", "TransportError", "Timeout"})


@contextmanager
def _hub_errors(repo: str):
    """Turn the hub's failures into a DownloadError that says what to do."""
    errors = _hub().errors
    try:
        yield
    except errors.GatedRepoError as e:
        raise DownloadError(
            f"{repo} is gated: accept its terms at https://huggingface.co/{repo} with your account, then "
            "give your token (--token, the download node's token input, or HF_TOKEN). If you did, access "
            "has not been granted yet or the token is wrong."
        ) from e
    except errors.RepositoryNotFoundError as e:
        raise DownloadError(f"{repo} was not found (or is private and needs --token).") from e
    except errors.OfflineModeIsEnabled as e:
        raise DownloadError(
            "HF_HUB_OFFLINE is set: unset it to download, or copy the files in by hand."
        ) from e
    except Exception as e:
        if not (isinstance(e, errors.HfHubHTTPError) or _unreachable(e)):
            raise
        raise DownloadError(
            f"cannot reach Hugging Face to fetch {repo} ({type(e).__name__}: {e}). Check the network "
            "connection or proxy settings; files already downloaded are kept and a new run resumes them."
        ) from e


def _endpoint() -> dict:
    """HF_ENDPOINT read at call time (huggingface_hub reads it once, at import): a mirror, or a test's."""
    endpoint = os.environ.get("HF_ENDPOINT")
    return {"endpoint": endpoint} if endpoint else {}


def remote_files(download: Download, token: str | None) -> dict[str, int]:
    """{file: bytes} of exactly what one download fetches (asks the hub; only the T5-Gemma index, a few
    kB, is downloaded to learn which shards hold the encoder)."""
    hub = _hub()
    with _hub_errors(download.file.repo):
        api = hub.HfApi(**_endpoint())
        info = api.model_info(download.file.repo, files_metadata=True, token=token)
        files = {s.rfilename: s.size or 0 for s in info.siblings}
        patterns = list(download.patterns)
        if download.file.name == "text_encoder":
            index_name = next(n for n in files if fnmatch.fnmatch(n, "*.safetensors.index.json"))
            index_path = hub.hf_hub_download(
                download.file.repo, index_name, local_dir=download.target, token=token, **_endpoint()
            )
            patterns += encoder_shards(json.loads(Path(index_path).read_text()))
    return {n: size for n, size in files.items() if any(fnmatch.fnmatch(n, p) for p in patterns)}


def resolve(download: Download, token: str | None) -> tuple[dict[str, int], int]:
    """The exact files ({name: bytes}) and total bytes one download fetches."""
    files = remote_files(download, token)
    return files, sum(files.values())


def fetch(download: Download, files: dict[str, int], token: str | None) -> Path:
    """Download exactly ``files`` (from ``resolve``) into the download's folder, with huggingface_hub's
    terminal progress bars; partial files from an earlier run resume."""
    return fetch_each(download, files, token, lambda n: None)


class _CountingFile:
    """A file that reports every write's size: how a progress bar outside the terminal follows
    huggingface_hub's ``http_get`` (which writes each chunk as it arrives)."""

    def __init__(self, file, on_bytes: Callable[[int], None]):
        self.file, self.on_bytes = file, on_bytes

    def write(self, data: bytes) -> int:
        written = self.file.write(data)
        self.on_bytes(len(data))
        return written

    def __getattr__(self, name):  # seek, tell, truncate, flush, name: the real file's
        return getattr(self.file, name)


def fetch_each(
    download: Download, files: dict[str, int], token: str | None, on_bytes: Callable[[int], None]
) -> Path:
    """Download ``files`` ({name: bytes}, from ``remote_files``) one by one, reporting bytes to ``on_bytes``
    (it may raise to cancel). A file already there at its full size is skipped. Each file is written to
    ``<name>.part`` first and renamed when complete, so a download broken off (cancelled, offline, crashed)
    resumes from the bytes on disk at the next run (huggingface_hub itself keeps no partial files)."""
    hub = _hub()
    from huggingface_hub.file_download import http_get

    headers = hub.utils.build_hf_headers(token=token)
    for name, size in files.items():
        local = download.target / name
        if local.is_file() and local.stat().st_size == size:
            on_bytes(size)
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        part = local.with_name(local.name + ".part")
        with _hub_errors(download.file.repo), part.open("ab") as file:
            resume = file.tell()
            on_bytes(resume)
            url = hub.hf_hub_url(download.file.repo, name, **_endpoint())
            counted = _CountingFile(file, on_bytes)
            http_get(url, counted, resume_size=resume, headers=headers, expected_size=size)
        part.replace(local)
    return download.target
