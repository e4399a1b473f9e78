"""`gptsmith quickstart`: the main job on the embedded defaults, no network, no GPU.

The default (`quickstart`, pretrained.py) takes the seeds' route: pull a pretrained chat model and make it an
assistant over Python's docs that is as good as it can be by measurement. `--from-scratch` (`from_scratch`,
scratch.py) trains a small GPT from nothing on the embedded data, to learn how one is made.
"""

from gptsmith.quickstart.pretrained import quickstart
from gptsmith.quickstart.scratch import from_scratch

__all__ = ["quickstart", "from_scratch"]
