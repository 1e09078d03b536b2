"""The Download Models node: fetches what a chosen example workflow needs from Hugging Face into ComfyUI's
model folders, with ComfyUI's progress bar. A thin adapter over pipeline/weights/download.py (the plan and
the resumable fetch the CLI's `download` command uses too); it downloads nothing until it runs."""

from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..pipeline.weights.catalogue import MODEL_FILES, WORKFLOW_FILES
from ..pipeline.weights.download import fetch_each, plan, remote_files

ALL = "all models"
NODE_NAME = "MagiHuman Download Models"


def _folders() -> dict[str, Path]:
    """Where each ComfyUI model folder downloads go: its first configured path (models/<folder> unless
    extra_model_paths.yaml makes another the default)."""
    return {
        entry.folder: Path(folder_paths.get_folder_paths(entry.folder)[0]) for entry in MODEL_FILES.values()
    }


class DownloadModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MagiHumanDownloadModels",
            display_name=NODE_NAME,
            category="MagiHuman",
            description="Downloads the models an example workflow needs (FP8 DiTs, T5-Gemma encoder shards, "
            "Turbo VAE, Stable Audio VAE, Wan2.2 VAE) from Hugging Face into ComfyUI's model folders. Run "
            "it once (Queue it on its own); files already there are skipped and a broken download resumes.",
            inputs=[
                io.Combo.Input(
                    "workflow",
                    options=[*WORKFLOW_FILES, ALL],
                    default="MagiHuman text to video (distilled)",
                    tooltip="The example workflow to get models for (the DiT, the text encoder and the "
                    "VAEs it loads); 'all models' fetches every model the pack can use (about 80 GB).",
                ),
                io.String.Input(
                    "token",
                    default="",
                    tooltip="A Hugging Face token (huggingface.co/settings/tokens) for the gated "
                    "repositories (T5-Gemma, Stable Audio): accept their terms on the website first. "
                    "Empty: HF_TOKEN or a saved `hf auth login`. A token typed here is saved with the "
                    "workflow, so prefer HF_TOKEN in shared workflows.",
                ),
            ],
            outputs=[io.String.Output(display_name="report")],
            is_output_node=True,
            not_idempotent=True,  # each run checks the folders again (files may have been removed)
        )

    @classmethod
    def execute(cls, workflow, token) -> io.NodeOutput:
        names = list(MODEL_FILES) if workflow == ALL else list(WORKFLOW_FILES[workflow])
        token = token.strip() or None
        folders = _folders()
        downloads = plan(names, Path(folder_paths.models_dir), folders)
        wanted = [(download, remote_files(download, token)) for download in downloads]
        total = sum(sum(files.values()) for _, files in wanted)
        bar, done = comfy.utils.ProgressBar(max(total, 1)), 0

        def on_bytes(n: int) -> None:
            nonlocal done
            done += n
            bar.update_absolute(min(done, total), total)
            mm.throw_exception_if_processing_interrupted()  # Cancel stops here; a rerun resumes

        lines = []
        for download, files in wanted:
            fetch_each(download, files, token, on_bytes)
            lines.append(f"{download.file.description}: {folders[download.file.folder] / download.file.path}")
        report = (
            f"{workflow}: {len(wanted)} models ready ({total / 1e9:.2f} GB)\n"
            + "\n".join(lines)
            + "\nRefresh (R) to see them in the loaders."
        )
        return io.NodeOutput(report, ui=ui.PreviewText(report))
