"""The usage rules of `aaclip import`, in a module free of torch so they answer at once."""

from __future__ import annotations

from pathlib import Path

from aaclip_core.errors import ConfigError
from aaclip_core.record import Tag


def check_import_sources(text_adapter: Path | None, image_adapter: Path | None, allow_image_only: bool) -> None:
    """The usage rules of `aaclip import`, checked before anything is read or built."""
    if text_adapter is None and image_adapter is None:
        raise ConfigError(
            "Nothing to import: pass --text-adapter text_adapter.pth (and usually --image-adapter "
            "image_adapter_N.pth) from the reference training."
        )
    if text_adapter is None and not allow_image_only:
        raise ConfigError(
            "--image-adapter without --text-adapter would leave the text anchors to untrained text "
            "adapters. Pass the matching text_adapter.pth with --text-adapter, or --allow-image-only "
            f"if that is what you want (the run is then tagged {Tag.adapter('text_adapter')}=untrained)."
        )
