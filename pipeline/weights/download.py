"""Fetching model files from Hugging Face into a ComfyUI models folder: a plan (pure, testable offline) and
its execution with ``huggingface_hub`` (resumable, with progress bars, a token for gated repositories)."""

import fnmatch
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .catalogue import MODEL_FILES, WORKFLOW_FILES, ModelFile

TEXT_ENCODER_PREFIXES = (
    "encoder.",
    "model.encoder.",
)  # T5-Gemma keys the encoder reads; decoder shards are skipped


class DownloadError(RuntimeError):
    """A download that cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class Download:
    """One ``snapshot_download`` call: which repository, which files, into which folder."""

    file: ModelFile
    target: Path  # local_dir handed to huggingface_hub

    @property
    def patterns(self) -> tuple[str, ...]:
        return self.file.patterns


def plan(names: list[str], models_dir: Path) -> list[Download]:
    """The downloads for catalogue entries ``names`` into ``models_dir`` (ComfyUI's ``models`` folder)."""
    unknown = [n for n in names if n not in MODEL_FILES]
    if unknown:
        raise DownloadError(f"unknown model file(s) {unknown}; known: {', '.join(MODEL_FILES)}")
    plans = []
    for name in dict.fromkeys(names):  # keep order, drop repeats
        entry = MODEL_FILES[name]
        plans.append(Download(entry, models_dir / entry.folder / entry.subdir))
    return plans


def files_for(
    dits: list[str], srs: list[str], workflows: list[str], extra: list[str], everything: bool
) -> list[str]:
    """Catalogue names for the command line's choices (``--dit distill --sr 1080p --workflow ...``)."""
    if everything:
        return list(MODEL_FILES)
    unknown = [w for w in workflows if w not in WORKFLOW_FILES]
    if unknown:
        raise DownloadError(f"unknown workflow(s) {unknown}; known: {', '.join(WORKFLOW_FILES)}")
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
            "pass --token <your token> (or set HF_TOKEN)."
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


def resolve(download: Download, token: str | None) -> tuple[list[str], int]:
    """The exact files and total bytes one download fetches (asks the hub; only the T5-Gemma index, a few
    kB, is downloaded to learn which shards hold the encoder)."""
    hub = _hub()
    with _hub_errors(download.file.repo):
        info = hub.HfApi().model_info(download.file.repo, files_metadata=True, token=token)
        files = {s.rfilename: s.size or 0 for s in info.siblings}
        patterns = list(download.patterns)
        if download.file.name == "text_encoder":
            index_name = next(n for n in files if fnmatch.fnmatch(n, "*.safetensors.index.json"))
            index_path = hub.hf_hub_download(
                download.file.repo, index_name, local_dir=download.target, token=token
            )
            patterns += encoder_shards(json.loads(Path(index_path).read_text()))
    chosen = [n for n in files if any(fnmatch.fnmatch(n, p) for p in patterns)]
    return chosen, sum(files[n] for n in chosen)


def fetch(download: Download, files: list[str], token: str | None) -> Path:
    """Download exactly ``files`` into the download's folder; partial files from an earlier run resume."""
    download.target.mkdir(parents=True, exist_ok=True)
    with _hub_errors(download.file.repo):
        _hub().snapshot_download(
            download.file.repo, allow_patterns=files, local_dir=download.target, token=token
        )
    return download.target
