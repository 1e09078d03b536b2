"""Stand-in for comfy_api.latest.io: the V3 schema types with the real keyword arguments."""

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

BASE = ("display_name", "optional", "tooltip", "lazy", "extra_dict", "raw_link")
WIDGET = BASE + ("default", "socketless", "force_input")
INPUT_KWARGS = {
    "BOOLEAN": WIDGET + ("label_on", "label_off"),
    "INT": WIDGET + ("min", "max", "step", "control_after_generate", "display_mode"),
    "FLOAT": WIDGET + ("min", "max", "step", "round", "display_mode"),
    "STRING": WIDGET + ("multiline", "placeholder", "dynamic_prompts"),
    "COMBO": WIDGET + ("options", "control_after_generate", "upload", "image_folder", "remote"),
}


class NumberDisplay(str, Enum):
    number = "number"
    slider = "slider"


class Input:
    io_type = None

    def __init__(self, id: str, *args, **kwargs):
        allowed = INPUT_KWARGS.get(self.io_type, BASE)
        if self.io_type == "COMBO" and args:  # Combo.Input(id, options, ...) takes options positionally
            kwargs["options"], args = args[0], args[1:]
        if args:
            raise TypeError(f"{type(self).__name__}: unexpected positional arguments {args}")
        unknown = set(kwargs) - set(allowed)
        if unknown:
            raise TypeError(f"{self.io_type}.Input got unexpected keyword arguments {sorted(unknown)}")
        self.id = id
        self.options = kwargs.pop("options", None)
        self.optional = kwargs.pop("optional", False)
        self.tooltip = kwargs.pop("tooltip", None)
        self.kwargs = kwargs

    @property
    def is_widget(self) -> bool:
        return self.io_type in INPUT_KWARGS

    @property
    def default(self):
        return self.kwargs.get("default")


class Output:
    io_type = None

    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list=False):
        self.id, self.display_name, self.tooltip = id, display_name, tooltip


def _type(io_type: str):
    cls = type(io_type, (), {"io_type": io_type})
    cls.Input = type("Input", (Input,), {"io_type": io_type})
    cls.Output = type("Output", (Output,), {"io_type": io_type})
    return cls


Boolean, Int, Float, String, Combo = (_type(t) for t in ("BOOLEAN", "INT", "FLOAT", "STRING", "COMBO"))
Image, Mask, Latent, Audio, Video = (_type(t) for t in ("IMAGE", "MASK", "LATENT", "AUDIO", "VIDEO"))


def Custom(io_type: str):  # noqa: N802 - the real API's name
    return _type(io_type)


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    search_aliases: list = field(default_factory=list)
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self):
        ids = [i.id for i in self.inputs]
        duplicates = [item for item, count in Counter(ids).items() if count > 1]
        if duplicates:
            raise ValueError(f"Input ids must be unique, but {duplicates} are not.")


class NodeOutput:
    def __init__(self, *args, ui=None, expand=None, block_execution=None):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args


class _HiddenHolder:
    unique_id = "1"


class ComfyNode:
    hidden = _HiddenHolder()

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError


class DynamicCombo:
    """A combo whose chosen option brings its own inputs (ComfyUI 0.33); execute gets one dict."""

    io_type = "COMFY_DYNAMICCOMBO_V3"

    class Option:
        def __init__(self, key: str, inputs: list):
            self.key, self.inputs = key, inputs

    class Input(Input):
        io_type = "COMFY_DYNAMICCOMBO_V3"

        def __init__(self, id: str, options: list, **kwargs):
            super().__init__(id, **kwargs)
            self.options = options
