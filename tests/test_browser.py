"""The pack in the real ComfyUI frontend, in a headless Chromium driven by Playwright, as a user meets it:
every workflow opened from a file and from the Templates browser shows no missing node, no widget value its
widget does not offer, no console error from the pack, and every node inside the visible canvas (not under
the sidebar, the top bar or the minimap) at a readable zoom; the Templates cards show the workflows' titles;
the distilled text-to-video workflow then runs from the Run button to a Save Video preview on the tiny demo
models. Screenshots go to $MAGIHUMAN_SCREENSHOTS (default: the test's temporary folder).

Runs with a real ComfyUI (COMFYUI_DIR, as the other real-ComfyUI tests) and a Chromium: $CHROMIUM, or
Debian's chromium package (`apt-get install chromium`); Playwright's own browser download is not used.
"""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import ROOT

pytest_plugins = ["comfyui_fixtures"]
sync_api = pytest.importorskip("playwright.sync_api")


def chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR (tests/COMFYUI.md)"),
    pytest.mark.skipif(chromium() is None, reason="no Chromium (apt-get install chromium, or set CHROMIUM)"),
]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
WINDOW = {"width": 1280, "height": 720}

# Everything the checks need from the page, read in one go: unknown node types, widget values outside what
# the widget offers, each node's rectangle on screen, and the window and the panels that cover the canvas
# (workflow tabs, sidebar, Run bar, minimap).
OVERLAYS = [
    ".workflow-tabs-container",
    ".side-tool-bar-container",
    ".actionbar-container",
    ".minimap-main-container",
]
INSPECT = (
    "() => { const OVERLAYS = "
    + json.dumps(OVERLAYS)
    + ";"
    + """
  const box = s => { const e = document.querySelector(s); if (!e) return null;
                     const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const ds = app.canvas.ds;
  const nodes = app.graph.nodes.map(n => {
    const [x, y] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT]);
    const [x2, y2] = ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
    const bad = (n.widgets || []).filter(w => {
      const values = w.options && w.options.values;
      if (w.type === "combo" && Array.isArray(values)) return !values.includes(w.value);
      if (w.type === "number") return w.value < w.options.min || w.value > w.options.max;
      return false;
    }).map(w => `${w.name}=${w.value}`);
    return {type: n.type, known: n.type in LiteGraph.registered_node_types, bad, rect: [x, y, x2, y2]};
  });
  const overlays = OVERLAYS.map(s => [s, box(s)]).filter(([, r]) => r && r[2] > r[0] && r[3] > r[1]);
  return {nodes, overlays, window: [innerWidth, innerHeight], scale: ds.scale};
}"""
)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("MAGIHUMAN_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, server):
    """The frontend, loaded and idle (the first-run Templates dialog closed), with its console recorded."""
    page = browser.new_page(viewport=WINDOW)
    page.console = []
    page.on("console", lambda m: page.console.append(f"{m.type}: {m.text} ({m.location.get('url')})"))
    page.on("pageerror", lambda e: page.console.append(f"pageerror: {e}"))
    page.goto(server.url)
    page.wait_for_function("window.app && app.graph && app.canvas && window.LiteGraph", timeout=120_000)
    page.wait_for_timeout(1500)
    page.keyboard.press("Escape")
    yield page
    page.close()


def wait_for_graph(page, path: Path) -> None:
    count = len(json.loads(path.read_text())["nodes"])
    page.wait_for_function(f"app.graph.nodes.length === {count}", timeout=30_000)
    page.wait_for_timeout(1500)  # let the frontend size the nodes and draw


def assert_in_view(seen: dict, node: dict, where: str) -> None:
    """A node's rectangle (title bar included) lies inside the window and under none of the panels."""
    x, y, x2, y2 = node["rect"]
    width, height = seen["window"]
    at = f"{where}: {node['type']} at {[round(v) for v in node['rect']]}"
    assert 0 <= x and x2 <= width and 0 <= y and y2 <= height, f"{at} is outside the window"
    for selector, (left, top, right, bottom) in seen["overlays"]:
        assert x2 <= left or x >= right or y2 <= top or y >= bottom, f"{at} is under {selector}"


def check_as_opened(page, path: Path, picture: Path) -> None:
    page.screenshot(path=str(picture))
    seen = page.evaluate(INSPECT)
    for node in seen["nodes"]:
        assert node["known"], f"{path.stem}: missing node type {node['type']}"
        assert not node["bad"], f"{path.stem}: {node['type']} widget values not offered: {node['bad']}"
        assert_in_view(seen, node, f"{path.stem} (see {picture})")
    # The Templates browser fits the graph to the window (frontend 1.49 ignores the saved view there): the
    # layout must be compact enough for that fit to keep widget text readable.
    assert seen["scale"] >= 0.6, f"{path.stem}: opened at {seen['scale']:.0%} zoom (see {picture})"
    ours = [
        line for line in page.console if "magihuman" in line.lower() and line.startswith(("error", "page"))
    ]
    assert not ours, ours


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_workflow_opens_from_a_file_whole_and_in_view(page, path, screenshots):
    page.locator("#comfy-file-input").set_input_files(str(path))
    wait_for_graph(page, path)
    check_as_opened(page, path, screenshots / f"file_{path.stem}.png")


def open_the_packs_templates(page):
    page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("daVinci-MagiHuman", exact=True).click()  # the pack's category, named by its locale
    return dialog


def test_the_templates_cards_show_the_workflow_titles(page, screenshots):
    """Frontend 1.49 titles a pack's card by its file name and ignores the pack's locale for it."""
    dialog = open_the_packs_templates(page)
    for path in WORKFLOWS:
        dialog.get_by_test_id(f"template-workflow-{path.stem}").wait_for()
    page.screenshot(path=str(screenshots / "templates.png"))
    titles = {
        path.stem: dialog.get_by_test_id(f"template-workflow-{path.stem}").inner_text() for path in WORKFLOWS
    }
    page.keyboard.press("Escape")
    for stem, text in titles.items():  # a card reads "Node graph" (its badge), then its title
        lines = [line.strip() for line in text.splitlines()]
        assert stem in lines and stem.startswith("MagiHuman ") and "_" not in text, (stem, text)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_workflow_opens_from_the_templates_browser_whole_and_in_view(page, path, screenshots):
    open_the_packs_templates(page).get_by_test_id(f"template-workflow-{path.stem}").click()
    wait_for_graph(page, path)
    check_as_opened(page, path, screenshots / f"template_{path.stem}.png")


def test_text_to_video_runs_from_the_run_button_to_a_save_video_preview(page, server, screenshots):
    path = ROOT / "workflows" / "MagiHuman text to video (distilled).json"
    page.locator("#comfy-file-input").set_input_files(str(path))
    wait_for_graph(page, path)
    small = {"seconds": 0.96, "width": 64, "height": 64, "steps": 2}  # seconds on CPU with the tiny models
    page.evaluate(f"""() => {{
      const small = {json.dumps(small)};
      const sampler = app.graph.nodes.find(n => n.type === "MagiHumanDistillSampler");
      for (const w of sampler.widgets) if (w.name in small) w.value = small[w.name];
    }}""")
    before = set(server.get("/history"))
    page.get_by_role("button", name="Run").first.click()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not page.locator("video").count():
        page.wait_for_timeout(1000)
    page.screenshot(path=str(screenshots / "run_text_to_video.png"))
    runs = [entry for key, entry in server.get("/history").items() if key not in before]
    assert len(runs) == 1, "Run queued nothing"
    assert runs[0]["status"]["status_str"] == "success", runs[0]["status"]
    assert page.locator("video").count() >= 1, "no Save Video preview"
    seen = page.evaluate(INSPECT)  # the preview has grown the Save Video node: still in view
    assert_in_view(seen, next(n for n in seen["nodes"] if n["type"] == "SaveVideo"), "after the run")
    source = page.locator("video").first.get_attribute("src") or page.locator(
        "video source"
    ).first.get_attribute("src")
    assert source and ".mp4" in source, source


def test_an_old_saved_super_resolution_node_keeps_its_values(page, screenshots):
    """Saved before the SR target became a dynamic combo: [target, width, height, seed, ...] for every target.
    web/legacy_widgets.js drops a preset's unused width and height, so nothing shifts (a custom one is the
    same order as today's)."""
    path = ROOT / "tests" / "fixtures" / "old_super_resolution_widgets.json"
    page.locator("#comfy-file-input").set_input_files(str(path))
    wait_for_graph(page, path)
    page.screenshot(path=str(screenshots / "old_super_resolution.png"))
    values = page.evaluate(
        "app.graph.nodes.sort((a, b) => a.id - b.id)"
        ".map(n => Object.fromEntries(n.widgets.map(w => [w.name, w.value])))"
    )
    preset, custom = values
    for node in values:  # the values saved after width and height, in their places
        assert (node["seed"], node["steps"], node["shift"], node["noise_index"]) == (42, 5, 5.0, 220), node
        assert (node["audio_noise_scale"], node["cfg_trick_frames"]) == (0.7, 13), node
    assert preset["target"] == "540p" and not any("width" in name for name in preset), preset
    assert custom["target"] == "custom", custom
    assert sorted(v for k, v in custom.items() if k.endswith(("width", "height"))) == [544, 960], custom
    seen = page.evaluate(INSPECT)
    assert all(not node["bad"] for node in seen["nodes"]), seen["nodes"]


def test_a_missing_single_file_model_is_offered_for_download(page, tmp_path, screenshots):
    """As on a host without the model: the workflow's single-file model renamed to an absent file (its
    download metadata renamed with it). The Errors panel's Missing Models list names it with its folder and a
    Download button (from the metadata); the folder models are the Download Models node's job, which the
    workflow's visible notes name."""
    graph = json.loads((ROOT / "workflows" / "MagiHuman text to video (distilled).json").read_text())
    absent = []
    for node in graph["nodes"]:
        for model in node.get("properties", {}).get("models", []):
            old, model["name"] = model["name"], "absent_" + model["name"].replace("/", "_")
            node["widgets_values"] = [model["name"] if v == old else v for v in node["widgets_values"]]
            absent.append((model["name"], model["directory"]))
    assert absent, "the workflow has a single-file model"
    path = tmp_path / "absent model.json"
    path.write_text(json.dumps(graph))
    page.locator("#comfy-file-input").set_input_files(str(path))
    wait_for_graph(page, path)
    page.get_by_text("View details").first.click()
    page.get_by_text("Missing Models", exact=True).wait_for()
    page.locator("button:visible", has_text="Download").first.wait_for()  # "Download" and "Download all"
    page.screenshot(path=str(screenshots / "missing_models.png"))
    text = page.inner_text("body")
    for name, folder in absent:
        assert name in text and folder in text, text[-2000:]
    assert "MagiHuman Download Models" in text, "the notes name the node that fetches the folder models"
