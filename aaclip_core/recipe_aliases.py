"""The reference's and the fork's setting names, and the aaclip settings they are.

One table (``recipe_aliases.toml``, shipped with the package) says it: `--set`, recipe errors,
``recipes show --aliases``, ``doctor`` and the README all read it from here.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from importlib import resources

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

TABLE_FILE = "recipe_aliases.toml"


@dataclass(frozen=True)
class Alias:
    old: str
    settings: tuple[str, ...]  # the aaclip setting paths; empty: no counterpart
    instead: str | None = None  # what to use when there is no counterpart

    @property
    def arrow(self) -> str:
        """``image_cross_attn_weight → cross.image_weight``: what `--set` reports."""
        return f"{self.old} → {', '.join(self.settings)}"


@functools.cache
def aliases() -> dict[str, Alias]:
    """Old name -> its alias entry."""
    table = tomllib.loads(resources.files("aaclip_core").joinpath(TABLE_FILE).read_text(encoding="utf-8"))
    out = {}
    for old, target in table["settings"].items():
        out[old] = Alias(old, (target,) if isinstance(target, str) else tuple(target))
    for old, instead in table["no_counterpart"].items():
        out[old] = Alias(old, (), instead)
    return out


@functools.cache
def old_names_of(setting: str) -> tuple[str, ...]:
    """The reference/fork names of an aaclip setting path (none for most)."""
    return tuple(a.old for a in aliases().values() if setting in a.settings)


def both_names(setting: str) -> str:
    """``cross.image_weight (image_cross_attn_weight)``, or the setting alone when it has no old name."""
    old = old_names_of(setting)
    return f"{setting} ({', '.join(old)})" if old else setting
