"""fgbg: foreground/background separation through concept distillation (Dombrowski et al., ICCV 2023)."""
from fgbg_utils.runs.params import ParamsError, load_params

__all__ = ["load_params", "ParamsError"]
__version__ = "0.1.0"
