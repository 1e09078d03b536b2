"""ComfyUI V3 node adapters: the only package that imports ComfyUI. Every node lives under "MagiHuman/"."""

from comfy_api.latest import ComfyExtension

from .conditioning import TextEncode
from .decode import Decode
from .download import DownloadModels
from .loaders import AudioVAELoader, DiTLoader, TextEncoderLoader, VAELoader
from .samplers import BaseSampler, DistillSampler
from .super_resolution import SuperResolution

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
    DownloadModels,
]


class MagiHumanExtension(ComfyExtension):
    async def get_node_list(self) -> list:
        return list(NODES)


async def comfy_entrypoint() -> MagiHumanExtension:
    return MagiHumanExtension()
