"""UI-format workflow -> API-format prompt, with a live server's ``/object_info`` as the schema.

ComfyUI core has no converter (the frontend's ``graphToPrompt`` does this in TypeScript). This one covers
what our example workflows use: plain nodes, links, muted/bypassed nodes and frontend-only notes (dropped),
the extra ``widgets_values`` slots that the frontend stores after some widgets (control_after_generate,
upload buttons), and widget defaults for values the file does not hold.
"""

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
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
        info = object_info[kind]
        linked = {
            socket["name"]: links[socket["link"]]
            for socket in node.get("inputs", [])
            if socket.get("link") is not None
        }
        values = node.get("widgets_values") or []
        position, inputs = 0, {}
        for section in ("required", "optional"):
            specs = info["input"].get(section, {})
            for name in info.get("input_order", {}).get(section, list(specs)):
                spec = specs[name]
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if _is_widget(spec):
                    value = values[position] if position < len(values) else options.get("default")
                    position += 1 + _extra_slots(options)
                    if value is not None:
                        inputs[name] = value
                if name in linked:  # a widget turned into a socket keeps its slot; the link wins
                    _, source, slot, *_ = linked[name]
                    inputs[name] = [str(source), slot]
        if position < len(values):
            raise ConversionError(
                f"node {node['id']} ({kind}): {len(values)} widget values for {position} widget slots"
            )
        prompt[str(node["id"])] = {
            "class_type": kind,
            "inputs": inputs,
            "_meta": {"title": node.get("title", kind)},
        }
    return prompt
