"""The AA-CLIP model as pure ``nn.Module``s: no training glue, no I/O."""

from aaclip_core.model.aaclip import AACLIP, ModelModes, build_model
from aaclip_core.model.adapters import Adapter, Projection, norm_matched_mix, rescale_to

__all__ = ["AACLIP", "ModelModes", "Adapter", "Projection", "build_model", "norm_matched_mix", "rescale_to"]
