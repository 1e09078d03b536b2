"""The example workflows: valid UI-format graphs that use only our nodes and core ones, with widget values and
links that match the node schemas; and each one executed end to end on the tiny demo models (with the fake
ComfyUI API and small sizes), as ComfyUI would run it."""

import json
import shutil
from collections import deque
from pathlib import Path

import av
import pytest
import torch
from conftest import ROOT
from magihuman.pipeline.media.example_voice import NAME as EXAMPLE_VOICE
from magihuman.pipeline.media.files import write_mp4
from magihuman.pipeline.weights.catalogue import MODEL_FILES, WORKFLOW_FILES

pytest_plugins = ["comfy_fixtures"]

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
# Core nodes the workflows may use: {type: (socket inputs, output types, widget count)}.
CORE = {
    "SaveVideo": ({"video": "VIDEO"}, [], 3),
    "LoadImage": ({}, ["IMAGE", "MASK"], 2),
    "LoadAudio": ({}, ["AUDIO"], 3),
    "MarkdownNote": ({}, [], 1),
    "Note": ({}, [], 1),
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
# window_seconds 0.48: the long-clip example runs its 0.96 s as two windows
SMALL = {"seconds": 0.96, "width": 64, "height": 64, "steps": 2, "window_seconds": 0.48}


def schemas(comfy):
    return {n.define_schema().node_id: (n, n.define_schema()) for n in comfy.nodes.NODES}


def widgets(schema, values: list) -> list:
    """(name, input) of each widget slot in UI order: a seed's control_after_generate slot follows it as
    (None, None); a dynamic combo's key is followed by the widgets of the option ``values`` choose, named
    "combo.widget"."""
    slots = []

    def walk(inputs, prefix):
        for i in inputs:
            if i.io_type == DYNAMIC_COMBO:
                slots.append((prefix + i.id, i))
                key = values[len(slots) - 1]
                option = next((o for o in i.options if o.key == key), None)
                assert option, f"{i.id} = {key!r} is not one of {[o.key for o in i.options]}"
                walk(option.inputs, f"{prefix}{i.id}.")
            elif i.io_type in WIDGET_TYPES:
                slots.append((prefix + i.id, i))
                if i.kwargs.get("control_after_generate"):
                    slots.append((None, None))

    walk(schema.inputs, "")
    return slots


def arguments(schema, values: list) -> dict:
    """The execute keywords ComfyUI builds from widget values: a dynamic combo is one dict holding its key
    under its own name and its option's widgets."""
    kwargs = {}
    for (name, spec), value in zip(widgets(schema, values), values, strict=True):
        if name is None:
            continue
        *parents, leaf = name.split(".")
        holder = kwargs
        for parent in parents:
            holder = holder[parent]
        holder[leaf] = {leaf: value} if spec.io_type == DYNAMIC_COMBO else value
    return kwargs


def test_the_workflows_are_the_documented_set():
    assert {p.stem for p in WORKFLOWS} == set(WORKFLOW_FILES)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_file_names_are_readable_windows_safe_titles(path):
    """The Templates browser (frontend 1.49) shows a pack's file name as the card title and the tab name."""
    name = path.stem
    assert name.startswith("MagiHuman ") and "_" not in name, name
    assert not set(name) & set('<>:"/\\|?*') and name == name.strip(" ."), name
    assert path.with_suffix(".jpg").is_file(), "the card's picture"


# Where nodes can be seen in a 1280x720 window (frontend 1.49): right of the sidebar, below the tabs and the
# Run bar, above the bottom, and not under the minimap in the bottom right corner (tests/test_browser.py
# checks the real page).
VISIBLE = (70, 100, 1250, 690)
MINIMAP = (1020, 460, 1280, 720)
TITLE_HEIGHT = 30  # a node's title bar sits above its pos


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_the_saved_view_shows_every_node_and_the_notes_when_it_opens(path):
    graph = json.loads(path.read_text())
    scale, (dx, dy) = graph["extra"]["ds"]["scale"], graph["extra"]["ds"]["offset"]
    for node in graph["nodes"]:
        (x, y), (w, h) = node["pos"], node["size"]
        left, top = (x + dx) * scale, (y - TITLE_HEIGHT + dy) * scale  # screen = (graph + offset) * scale
        right, bottom = (x + w + dx) * scale, (y + h + dy) * scale
        assert VISIBLE[0] <= left and right <= VISIBLE[2], f"{node['type']} x {left:.0f}..{right:.0f}"
        assert VISIBLE[1] <= top and bottom <= VISIBLE[3], f"{node['type']} y {top:.0f}..{bottom:.0f}"
        clear = right <= MINIMAP[0] or bottom <= MINIMAP[1]
        assert clear, f"{node['type']} at {left:.0f},{top:.0f}..{right:.0f},{bottom:.0f} is under the minimap"
        # Saved sizes leave room for every socket and widget row, so the frontend does not grow the node
        # out of the view.
        rows = max(len(node["inputs"]), len(node["outputs"])) + len(node["widgets_values"])
        assert h >= 20 * rows, f"{node['type']} is {h} high for {rows} rows"
    assert scale >= 0.6, "readable at the saved zoom"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_opened_from_templates_the_fit_to_view_is_readable(path):
    """From the Templates browser the frontend ignores the saved view and fits the nodes' bounds into 75% of
    the window (LGraphCanvas ds.fitToBounds, frontend 1.49): at 1280x720 it must stay >= 60% (measured in
    tests/test_browser.py). The frontend's bounds are ~20 px taller than the saved sizes, hence 62% here."""
    nodes = json.loads(path.read_text())["nodes"]
    left, top = min(n["pos"][0] for n in nodes), min(n["pos"][1] - TITLE_HEIGHT for n in nodes)
    right = max(n["pos"][0] + n["size"][0] for n in nodes)
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes)
    fit = min(0.75 * 1280 / (right - left), 0.75 * 720 / (bottom - top))
    assert fit >= 0.62, f"fits at {fit:.0%} ({right - left} x {bottom - top})"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_single_file_models_carry_the_frontends_download_metadata(path):
    """The frontend's Missing Models list offers a download for these (folders: the Download Models node)."""
    by_path = {entry.path: entry for entry in MODEL_FILES.values() if not entry.path.endswith("/")}
    found = 0
    for node in json.loads(path.read_text())["nodes"]:
        for value in node["widgets_values"]:
            if isinstance(value, str) and value in by_path:
                entry, found = by_path[value], found + 1
                assert {
                    "name": value,
                    "url": f"https://huggingface.co/{entry.repo}/resolve/main/{entry.patterns[0]}",
                    "directory": entry.folder,
                } in node["properties"]["models"], f"{node['type']}: {value}"
    singles = [n for n in WORKFLOW_FILES[path.stem] if not MODEL_FILES[n].path.endswith("/")]
    assert found == len(singles)


def test_templates_have_readable_descriptions_and_a_category_name():
    """The Templates browser titles a pack's card by its file name (frontend 1.49), and shows the pack's
    folder name and the file name again as category and description, unless the pack's locale gives them
    (keyed by the folder name of a git clone and of a registry install). The notes start with the title."""
    locale = json.loads((ROOT / "locales" / "en" / "main.json").read_text())["templateWorkflows"]
    for module in ("ComfyUI-MagiHuman", "magihuman"):
        assert locale["category"][module] == "daVinci-MagiHuman"
        for path in WORKFLOWS:
            graph = json.loads(path.read_text())
            note = next(n for n in graph["nodes"] if n["type"] == "MarkdownNote")["widgets_values"][0]
            assert note.startswith(f"## {graph['extra']['title']}\n")
            # the first-run hint names this workflow as the Download Models node and the CLI call it
            assert f"choose `{path.stem}`" in note and f'--workflow "{path.stem}"' in note
            description = locale["templateDescription"][module][path.stem]
            assert description in note and len(description.split()) >= 8


def test_the_lipsync_workflow_loads_the_example_voice_with_a_speaking_prompt():
    graph = json.loads((ROOT / "workflows" / "MagiHuman lip-sync to your audio (distilled).json").read_text())
    nodes = {n["type"]: n for n in graph["nodes"]}
    assert nodes["LoadAudio"]["widgets_values"][0] == EXAMPLE_VOICE
    prompt = nodes["MagiHumanTextEncode"]["widgets_values"][0]
    assert "lips" in prompt and "Dialogue" not in prompt  # the words come from the audio


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_graph_uses_known_nodes_and_matching_widgets_and_links(comfy, path):
    graph = json.loads(path.read_text())
    ours = schemas(comfy)
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert any(n["type"] == "SaveVideo" for n in nodes.values()), "every example saves an mp4"
    assert any(n["type"] in ("MarkdownNote", "Note") for n in nodes.values()), (
        "every example notes its models"
    )
    for n in nodes.values():
        assert n["type"] in ours or n["type"] in CORE, f"unknown node {n['type']}"
        if n["type"] in ours:
            schema = ours[n["type"]][1]
            expected = widgets(schema, n["widgets_values"])
            assert len(n["widgets_values"]) == len(expected), f"{n['type']} widgets"
            for (name, spec), value in zip(expected, n["widgets_values"], strict=True):
                if (
                    spec is not None
                    and spec.io_type == "COMBO"
                    and not name.endswith(("model", "vae", "encoder"))
                ):
                    assert value in spec.options, f"{n['type']}.{name} = {value!r}"
            sockets = [i for i in schema.inputs if i.io_type not in WIDGET_TYPES | {DYNAMIC_COMBO}]
            required = {i.id for i in sockets if not i.optional}
            linked = {i["name"] for i in n["inputs"] if i["link"] is not None}
            assert required <= linked, f"{n['type']} misses {required - linked}"
        else:
            assert len(n["widgets_values"]) == CORE[n["type"]][2]
    for link_id, src, slot, dst, dst_slot, kind in graph["links"]:
        source = nodes[src]
        assert source["outputs"][slot]["type"] == kind and link_id in source["outputs"][slot]["links"]
        target_input = nodes[dst]["inputs"][dst_slot]
        assert target_input["link"] == link_id and target_input["type"] == kind
        if nodes[dst]["type"] in ours:
            spec = next(i for i in ours[nodes[dst]["type"]][1].inputs if i.id == target_input["name"])
            assert spec.io_type == kind, f"{nodes[dst]['type']}.{spec.id} takes {spec.io_type}, gets {kind}"
        else:
            assert CORE[nodes[dst]["type"]][0][target_input["name"]] == kind


def run_graph(comfy, graph, output_dir):
    """Execute a UI graph in dependency order: our nodes through their execute, core ones by stand-ins."""
    ours = schemas(comfy)
    nodes = {n["id"]: n for n in graph["nodes"] if n["type"] not in ("MarkdownNote", "Note")}
    sources = {(link[3], link[4]): (link[1], link[2]) for link in graph["links"]}
    results, written = {}, []
    pending = deque(sorted(nodes))
    while pending:
        node_id = pending.popleft()
        node = nodes[node_id]
        inputs = {}
        for slot, socket in enumerate(node["inputs"]):
            src = sources.get((node_id, slot))
            if src is not None:
                if src[0] not in results:
                    break
                inputs[socket["name"]] = results[src[0]][src[1]]
        else:
            results[node_id] = execute(comfy, ours, node, inputs, output_dir, written)
            continue
        pending.append(node_id)
    return written


def execute(comfy, ours, node, inputs, output_dir, written):
    kind = node["type"]
    if kind == "LoadImage":
        return torch.rand(1, 90, 160, 3), torch.zeros(1, 90, 160)
    if kind == "LoadAudio":
        t = torch.arange(44100) / 44100
        return ({"waveform": torch.sin(2 * torch.pi * 200 * t).expand(1, 2, -1), "sample_rate": 44100},)
    if kind == "SaveVideo":
        video, path = inputs["video"], output_dir / f"{node['widgets_values'][0].replace('/', '_')}.mp4"
        if hasattr(video, "get_stream_source"):  # a file already (Decode to Video File): SaveVideo remuxes it
            written.append(Path(shutil.copyfile(video.get_stream_source(), path)))
            return ()
        components = video.get_components()
        written.append(write_mp4(path, components.images, components.audio, int(components.frame_rate)))
        return ()
    cls, schema = ours[kind]
    values = arguments(schema, node["widgets_values"])
    for name, small in SMALL.items():
        if name in values:
            values[name] = min(values[name], small) if name == "steps" else small
    if kind == "MagiHumanSuperResolution":
        values["target"] = {"target": "custom", "width": 128, "height": 96}
    return cls.execute(**values, **inputs).result


@pytest.fixture(scope="module")
def published_names(comfy):
    """The demo models under every name the workflows use (base and 1080p SR share the demo weights)."""
    models = comfy.models / "diffusion_models"
    made = []
    for alias, source in (("base_fp8", "distill_fp8"), ("1080p_sr_fp8", "540p_sr_fp8")):
        if not (models / alias).exists():
            (models / alias).symlink_to(models / source, target_is_directory=True)
            made.append(models / alias)
    yield comfy
    for link in made:  # the demo models are shared by the session: later tests expect them as built
        link.unlink()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_end_to_end_and_saves_an_mp4_with_sound(published_names, path, tmp_path):
    written = run_graph(published_names, json.loads(path.read_text()), tmp_path)
    assert len(written) == 1 and written[0].stat().st_size > 0
    with av.open(str(written[0])) as container:
        assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
        assert container.streams.audio[0].channels == 2
