"""ComfyUI nodes: the only place that imports ComfyUI. One file per topic (added with the nodes issue)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
