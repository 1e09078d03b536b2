"""daVinci-MagiHuman for ComfyUI: the pack's entry point.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint``. Outside ComfyUI (tests, ``cli.py``)
the package must import cleanly, so the node adapters are only loaded when ComfyUI itself can be imported.
"""

try:
    import comfy  # noqa: F401  (probe only: is this running inside ComfyUI?)
except ImportError:
    comfy = None

if comfy is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

# The frontend extension that loads workflows saved by older versions of the pack (web/legacy_widgets.js).
WEB_DIRECTORY = "./web"
