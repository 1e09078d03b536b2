"""ComfyUI V3 node adapters: the only package that imports ComfyUI."""
