"""Stand-in for comfy_api.latest.ui: the preview the Download Models node shows."""


class PreviewText:
    def __init__(self, value: str, **kwargs):
        self.value = value

    def as_dict(self) -> dict:
        return {"text": (self.value,)}
