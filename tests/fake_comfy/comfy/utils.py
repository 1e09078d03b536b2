"""Stand-in for comfy.utils.ProgressBar: records every update (and whether it carried a preview)."""

bars: list = []


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.current, self.updates = total, 0, []
        bars.append(self)

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = value
        self.updates.append((value, self.total, preview))

    def update(self, value):
        self.update_absolute(self.current + value, self.total)
