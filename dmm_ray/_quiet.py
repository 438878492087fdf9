"""Library notices that say nothing to a dmm-ray user, dropped at their loggers (nothing else is).

- transformers, once per process (so once per Ray worker): "`CLIPImageProcessor` requires torchvision
  (not installed); falling back to ...Pil". diffusers imports the safety checker's image processor,
  which a merge never uses; torchvision is not a dependency (it would pull a second torch build).
- diffusers, per LoRA teacher: "No LoRA keys associated to CLIPTextModel ... This is safe to ignore"
  (the zoo's and most community LoRAs train the UNet only).

`DMM_VERBOSE=1` keeps them. Installed by `import dmm_ray`, before transformers or diffusers log.
"""

from __future__ import annotations

import logging
import os

_DROPPED = {
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    "diffusers.loaders.lora_base": ("No LoRA keys associated to",),
    "diffusers.loaders.peft": ("No LoRA keys associated to",),
}


class _DropNotices(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def install() -> None:
    if os.environ.get("DMM_VERBOSE"):
        return
    for name, fragments in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(fragments))
