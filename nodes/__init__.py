"""ComfyUI V3 node adapters: the only package that imports ComfyUI. Every node lives under "MagiHuman/"."""

import logging

import folder_paths
from comfy_api.latest import ComfyExtension

from ..pipeline.media.example_voice import install_example_voice
from .conditioning import TextEncode
from .decode import Decode, DecodeToFile
from .download import DownloadModels
from .loaders import AudioVAELoader, DiTLoader, TextEncoderLoader, VAELoader
from .samplers import BaseSampler, DistillSampler
from .super_resolution import SuperResolution
from .windows import LongClipWindows

NODES = [
    DiTLoader,
    VAELoader,
    AudioVAELoader,
    TextEncoderLoader,
    TextEncode,
    DistillSampler,
    BaseSampler,
    SuperResolution,
    Decode,
    DecodeToFile,
    DownloadModels,
    LongClipWindows,
]


class MagiHumanExtension(ComfyExtension):
    async def on_load(self) -> None:
        # The lip-sync workflow's Load Audio names this file: it opens without a missing input.
        if install_example_voice(folder_paths.get_input_directory()) is None:
            logging.warning("MagiHuman: could not write the example voice into ComfyUI's input folder")

    async def get_node_list(self) -> list:
        return list(NODES)


async def comfy_entrypoint() -> MagiHumanExtension:
    return MagiHumanExtension()
