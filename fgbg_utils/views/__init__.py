"""Figures, walkthrough helpers and explorers of the notebooks. Importing the package drops
diffusers' load-time note about float32 modules (a harmless notice that would otherwise show as a
stderr block in every notebook that loads a model)."""
import logging

from fgbg_utils.runs.notebook import drop

drop(logging.getLogger("diffusers.models.modeling_utils"), "should be kept in float32")
