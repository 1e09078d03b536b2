"""Stand-in for comfy_api.latest: ComfyExtension, io, ui, InputImpl, Types."""

from fractions import Fraction
from typing import NamedTuple

from . import io, ui  # noqa: F401


class ComfyExtension:
    async def on_load(self) -> None:
        pass

    async def get_node_list(self) -> list:
        raise NotImplementedError


class _VideoComponents(NamedTuple):
    images: object
    audio: object = None
    frame_rate: Fraction = Fraction(24)
    metadata: object = None


class Types:
    VideoComponents = _VideoComponents


class _VideoFromComponents:
    def __init__(self, components: _VideoComponents):
        self._components = components

    def get_components(self) -> _VideoComponents:
        return self._components

    def get_dimensions(self) -> tuple[int, int]:
        return self._components.images.shape[2], self._components.images.shape[1]


class _VideoFromFile:
    def __init__(self, file):
        self.file = file

    def get_stream_source(self):
        return self.file


class InputImpl:
    VideoFromComponents = _VideoFromComponents
    VideoFromFile = _VideoFromFile
