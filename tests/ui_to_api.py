"""UI-format workflow -> API-format prompt, with a live server's ``/object_info`` as the schema.

ComfyUI core has no converter (the frontend's ``graphToPrompt`` does this in TypeScript). This one covers
what our example workflows use: plain nodes, links, muted/bypassed nodes and frontend-only notes (dropped),
the extra ``widgets_values`` slots that the frontend stores after some widgets (control_after_generate,
upload buttons), dynamic combos, and widget defaults for values the file does not hold.

A dynamic combo (``COMFY_DYNAMICCOMBO_V3``, ComfyUI 0.33's Save Video ``format`` or our SR ``target``) is one
widget slot for its key, followed by the widgets of the chosen option, recursively; in the API prompt the
nested ones are named ``parent.child`` (``format.codec``), as the frontend sends them.
"""

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
MUTED, BYPASSED = 2, 4
# Slots the frontend stores after a file combo with an upload button: the button ("image" for LoadImage);
# LoadAudio adds its player widget too.
UPLOAD_SLOTS = {"image_upload": 1, "audio_upload": 2, "video_upload": 1}


class ConversionError(ValueError):
    pass


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _extra_slots(options: dict) -> int:
    extra = 1 if options.get("control_after_generate") else 0
    return extra + sum(n for flag, n in UPLOAD_SLOTS.items() if options.get(flag))


def _options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _ordered(schema: dict):
    """(name, spec) of an ``input`` dict's required then optional entries, in the server's order."""
    for section in ("required", "optional"):
        specs = schema.get(section, {})
        for name in schema.get("input_order", {}).get(section, list(specs)):
            yield name, specs[name]


class _Widgets:
    """Reads a node's ``widgets_values`` slot by slot."""

    def __init__(self, values: list):
        self.values, self.position = values, 0

    def take(self, default, extra: int = 0):
        value = self.values[self.position] if self.position < len(self.values) else default
        self.position += 1 + extra
        return value


def _read(schema: dict, widgets: _Widgets, prefix: str, inputs: dict) -> None:
    for name, spec in _ordered(schema):
        options = _options(spec)
        if spec[0] == DYNAMIC_COMBO:
            keys = [option["key"] for option in options["options"]]
            key = widgets.take(options.get("default", keys[0]))
            inputs[prefix + name] = key
            if key not in keys:
                raise ConversionError(f"{prefix + name}: {key!r} is not one of {keys}")
            chosen = options["options"][keys.index(key)]["inputs"]
            _read(chosen, widgets, f"{prefix}{name}.", inputs)
        elif _is_widget(spec):
            value = widgets.take(options.get("default"), _extra_slots(options))
            if value is not None:
                inputs[prefix + name] = value


def to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt {node id: {"class_type", "inputs", "_meta"}} of a UI workflow."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if node.get("mode", 0) in (MUTED, BYPASSED) or kind in ("Note", "MarkdownNote"):
            continue
        if kind not in object_info:
            raise ConversionError(f"node {node['id']}: type '{kind}' is not installed in this ComfyUI")
        values = node.get("widgets_values") or []
        widgets, inputs = _Widgets(values), {}
        _read(object_info[kind]["input"], widgets, "", inputs)
        if widgets.position < len(values):
            raise ConversionError(
                f"node {node['id']} ({kind}): {len(values)} widget values for {widgets.position} widget slots"
            )
        for socket in node.get("inputs", []):  # a widget turned into a socket keeps its slot; the link wins
            if socket.get("link") is not None:
                _, source, slot, *_ = links[socket["link"]]
                inputs[socket["name"]] = [str(source), slot]
        prompt[str(node["id"])] = {
            "class_type": kind,
            "inputs": inputs,
            "_meta": {"title": node.get("title", kind)},
        }
    return prompt
