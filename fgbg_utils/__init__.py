"""fgbg: foreground/background separation through concept distillation (Dombrowski et al., ICCV 2023).

In memory: ``FgBgPipeline`` (``fgbg_utils.core.pipeline``) and its result dataclasses. With a run
folder: ``load_params`` and the stages."""
from fgbg_utils.runs.params import ParamsError, load_params

_PIPELINE_NAMES = ("FgBgPipeline", "AttentionMaps", "PreliminaryMasks", "Refinement", "Samples")

__all__ = ["load_params", "ParamsError", *_PIPELINE_NAMES]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Import the pipeline (torch, diffusers) only when it is asked for."""
    if name in _PIPELINE_NAMES:
        from fgbg_utils.core import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'fgbg_utils' has no attribute {name!r}")
