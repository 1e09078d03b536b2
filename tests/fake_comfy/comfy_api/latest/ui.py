"""Stand-in for comfy_api.latest.ui (unused by the pack so far)."""
