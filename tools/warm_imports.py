"""Import, once, what the test suite's processes import, so that their .pyc files are written by one
process before pytest starts its workers (the Makefile installs with `pip --no-compile`; without
this, the suite's first parallel processes would each compile torch, diffusers, ... themselves).
Only a cache: a module that fails to import here is skipped and imported by its test as usual."""
import importlib
import os
import pkgutil
import time
import warnings

THIRD_PARTY = (
    "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors.torch", "numpy", "scipy.linalg",
    "scipy.ndimage", "scipy.stats", "sklearn.mixture", "cv2", "PIL.Image", "matplotlib.pyplot", "pydantic",
    "yaml", "tqdm", "torchmetrics", "papermill", "nbclient", "nbformat", "jupytext", "ipykernel.kernelapp",
    "ipywidgets", "IPython", "pytest", "nbval.plugin", "xdist", "tokenizers",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
    "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3", "diffusers.pipelines.flux.pipeline_flux",
    "transformers.models.clip.modeling_clip", "transformers.models.t5.modeling_t5",
    "transformers.models.clip.tokenization_clip",
)


def main() -> None:
    t0 = time.time()
    warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    names = list(THIRD_PARTY)
    import fgbg_utils
    names += [m.name for m in pkgutil.walk_packages(fgbg_utils.__path__, "fgbg_utils.")
              if not m.name.endswith("__main__")]
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except (Exception, SystemExit):  # noqa: BLE001 - a cache only
            failed.append(name)
    print(f"warm_imports: {len(names) - len(failed)} modules in {time.time() - t0:.0f} s"
          + (f" (skipped: {', '.join(failed)})" if failed else ""))


if __name__ == "__main__":
    main()
