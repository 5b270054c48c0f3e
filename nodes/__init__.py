"""ComfyUI nodes: the only place that imports ComfyUI. One file per topic.

Importable only inside ComfyUI (it imports ``comfy`` and ``folder_paths``); the pack's top-level
``__init__`` turns the ImportError outside ComfyUI into empty mappings.
"""

from .calibrate import NODE_CLASS_MAPPINGS as _CALIBRATE_NODES
from .calibrate import NODE_DISPLAY_NAME_MAPPINGS as _CALIBRATE_NAMES
from .explain import NODE_CLASS_MAPPINGS as _EXPLAIN_NODES
from .explain import NODE_DISPLAY_NAME_MAPPINGS as _EXPLAIN_NAMES
from .guard import NODE_CLASS_MAPPINGS as _GUARD_NODES
from .guard import NODE_DISPLAY_NAME_MAPPINGS as _GUARD_NAMES
from .mitigate import NODE_CLASS_MAPPINGS as _MITIGATE_NODES
from .mitigate import NODE_DISPLAY_NAME_MAPPINGS as _MITIGATE_NAMES
from .neurons import NODE_CLASS_MAPPINGS as _NEURON_NODES
from .neurons import NODE_DISPLAY_NAME_MAPPINGS as _NEURON_NAMES
from .protect import NODE_CLASS_MAPPINGS as _PROTECT_NODES
from .protect import NODE_DISPLAY_NAME_MAPPINGS as _PROTECT_NAMES
from .protect_sampler import NODE_CLASS_MAPPINGS as _PROTECTED_SAMPLER_NODES
from .protect_sampler import NODE_DISPLAY_NAME_MAPPINGS as _PROTECTED_SAMPLER_NAMES
from .testbed import NODE_CLASS_MAPPINGS as _TESTBED_NODES
from .testbed import NODE_DISPLAY_NAME_MAPPINGS as _TESTBED_NAMES

NODE_CLASS_MAPPINGS: dict[str, type] = {**_TESTBED_NODES, **_GUARD_NODES, **_EXPLAIN_NODES, **_NEURON_NODES}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {**_TESTBED_NAMES, **_GUARD_NAMES, **_EXPLAIN_NAMES, **_NEURON_NAMES}
NODE_CLASS_MAPPINGS.update({**_MITIGATE_NODES, **_CALIBRATE_NODES, **_PROTECT_NODES, **_PROTECTED_SAMPLER_NODES})
NODE_DISPLAY_NAME_MAPPINGS.update({**_MITIGATE_NAMES, **_CALIBRATE_NAMES, **_PROTECT_NAMES,
                                   **_PROTECTED_SAMPLER_NAMES})
