"""Parameter files: one typed pydantic config (each parameter declared once, with its default, type,
allowed values and a one-line doc), validation that names the key and the file, and
`--set key=value` overrides with dotted keys. Stages receive the typed `Config` (attribute access)."""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fgbg_utils.training.config import FinetuneSettings, SegSettings

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ParamsError(ValueError):
    """A parameter file or override is invalid; the message names the key, the file and the fix."""


def P(default, doc: str, **kw):
    """A parameter: its default and its one-line doc (shown in errors and in the README)."""
    return Field(default, description=doc, **kw)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, validate_default=True)


SegRow = Literal["unet_M_pre", "unet_D_s", "unet_D_s_plus_synth", "supervised"]
SEG_ROWS = ("unet_M_pre", "unet_D_s", "unet_D_s_plus_synth", "supervised")
Split = Literal["train", "val", "test"]


class ModelParams(Section):
    path: str = P("models/toy-ldm",
            "hub id, local diffusers folder, or single .safetensors/.ckpt file of the pretrained model")
    revision: Optional[str] = P(None, "hub revision (pin it for real models)")
    config: Optional[str] = P(None,
            "single-file checkpoints: local diffusers folder with the model's configs (no network)")
    max_sequence_length: Optional[int] = P(None, "SD3 / Flux: T5 tokens in the joint text sequence; null = "
                                           "the pipeline's default (SD3 256, Flux 512); SD and SDXL (no T5) "
                                           "ignore it", ge=1, le=512)


class DatasetParams(Section):
    kind: Literal["toy", "folder", "cub"] = P("toy", "toy, folder or cub")
    root: Optional[str] = P(None, "dataset folder; for toy, null = a cache keyed by parameters")
    seed: int = P(0, "toy generator seed / split seed for folders without split.csv", ge=0)
    n_train: int = P(96, "toy: number of training images", ge=0)
    n_test: int = P(64, "toy: number of test images", ge=0)
    image_size: int = P(64, "toy: image size in pixels", ge=8)
    background_fraction: float = P(0.0, "toy: share of background-only images", ge=0, le=1)
    backgrounds: Literal["corpus", "novel"] = P("corpus", "toy: background kinds, the toy LDM's own "
                                                "(corpus) or kinds it never saw (novel)")
    test_fraction: float = P(0.3, "folder without split.csv: share of test images", ge=0, le=1)
    splits: list[Split] = P(["train", "test"], "which splits the stages process")
    limit: Optional[int] = P(None, "at most this many images per split")
    on_corrupt: Literal["skip", "error"] = P("skip", "skip (warn and list) or error")
    ground_truth: bool = P(True, "read masks/ as ground truth (false: treat as unlabelled)")


class AttentionParams(Section):
    grid_steps: int = P(50, "DDIM grid size; T0 takes its lowest entries [P: 50]", ge=1)
    batch_rows: Union[int, Literal["auto"]] = P(160,
            "UNet rows per call (images x noise levels), the memory budget; auto: from free GPU memory")
    latent: Literal["mode", "sample"] = P("mode", "VAE posterior: mode (deterministic) or sample [C]")
    sweep: bool = P(True, "also keep all grid_steps per-timestep maps for the T0 sweep")
    keep_per_layer: bool = P(True, "keep per-layer maps for exploration")
    layers: Optional[list[str]] = P(None, "layers averaged into M̂: fnmatch patterns of their names, "
                                          "e.g. 'up_blocks.*'; null = all [P]")
    aggregation: Literal["cross", "concept"] = P("cross", "cross: the object token's attention "
                                                 "probabilities [P]; concept (SD3, Flux): ConceptAttention's "
                                                 "output-space map, softmax over the object and `concepts`")
    concepts: list[str] = P(["background"], "aggregation concept: the other concept words the object "
                                             "competes with (each put into the prompt in place of the object)")


class BinarizationParams(Section):
    orphan_filter: bool = P(True, "3x3 majority filter after the GMM [P]")
    gmm_seed: int = P(0, "random_state of the GMM [I]")


class FinetuneParams(FinetuneSettings, Section):
    """Stage 03: the trainer's settings (declared in training.config) and its evaluation samples."""
    eval_samples: int = P(16, "y_f and y_b samples before/after fine-tuning (0: none)", ge=0)
    eval_steps: int = P(50, "DDIM steps of those samples", ge=1)
    eval_guidance: float = P(3.0, "guidance_scale w of the y_b-vs-y_f contrast samples (concept scale s = 1 - w)")


class RefinementParams(Section):
    steps: int = P(50, "DDIM steps of the inpainting [P]", ge=1)
    guidance_scale: float = P(1.0, "w > 1: CFG with y_f as the negative prompt (concept scale s = 1 - w)")
    reference: Literal["roundtrip", "original"] = P("roundtrip",
            "difference against the VAE round trip or the original")
    batch_size: int = P(8, "images per inpainting batch", ge=1)
    orphan_filter: bool = P(True, "orphan filter inside g [C]")
    postprocess: bool = P(False, "binary closing + hole filling [C, off by default]")
    gmm_seed: int = P(0, "random_state of the GMM")


class SynthesisParams(Section):
    n_images: Optional[int] = P(None, "synthetic images D' (null: as many as the train split) [I]", ge=0)
    guidance: float = P(1.0, "concept guidance s of D' (1: plain y_f) [I: paper's FID at 1]")
    steps: int = P(50, "DDIM steps [C]", ge=1)
    batch_size: int = P(16, "images per sampling batch", ge=1)
    background_images: int = P(16, "pure backgrounds sampled with y_b", ge=0)
    background_guidance: float = P(-2.0, "s of the pure backgrounds (< 0: away from y_f)")
    sweep_scales: list[float] = P([-2, -1, 0, 1, 2, 3, 5, 7.5], "scales of the guidance-sweep figure")
    sweep_seeds: int = P(3, "seeds (rows) of the guidance-sweep figure", ge=0)
    fid_features: Optional[str] = P("models/toy-features",
            "FID feature network: a TorchScript Inception-v3 file (NVIDIA's inception-2015-12-05.pt, as "
            "clean-fid/StyleGAN use) or a project feature-net folder (toy: models/toy-features); null: no FID")
    fid_scales: list[float] = P([1, 3, 7.5],
            "guidance scales s of the FID sweep (the paper's Fig. 8); the run's own s is added")
    fid_images: int = P(32, "generated images per scale of the FID sweep (the run's own s: the first of D')", ge=2)
    disk_budget_gb: float = P(50.0, "refuse n_images whose outputs could exceed this (raw upper bound; CUB: ~24 GB)")


class SegmentationParams(SegSettings, Section):
    """Stage 06: the U-Net's settings (declared in training.segnet) and which rows to train."""
    rows: list[SegRow] = P(list(SEG_ROWS), "U-Net rows of Table 2 to train")
    protocol: Literal["full", "center_crop"] = P("full", "full (original size) or center_crop (the official crop)")
    detector_area: float = P(0.01, "object-free check: supervised U-Net area below this")
    synthetic_filter_iou: float = P(0.0,
            "keep a D'_s pair only if its mask reaches this IoU with U-Net(D_s)'s prediction on the "
            "synthetic image (0: keep all) [ours, label-free]", ge=0, le=1)
    supervised_step_factor: float = P(1.0,
            "the supervised row (ground-truth labels, the upper bound) trains this many times `steps` "
            "[ours]", gt=0, le=100)
    steps_for_images: Optional[int] = P(None,
            "`steps` is the budget for this many training images: a training split of n images trains "
            "max(round(steps · n / this), min(steps, min_steps)) steps per network, every row alike (D ∪ D′ "
            "too, as the paper trains each row equally long), so a smaller or larger dataset gets the same "
            "passes over D (null: `steps` for any n) [ours]", ge=1)
    min_steps: int = P(60,
            "with `steps_for_images`, a smaller dataset still trains at least this many steps (never more than "
            "`steps`): a network from scratch needs about 60 to leave its all-background start [val, 32 images]", ge=1)
    supervised_ensemble: Optional[int] = P(None,
            "networks in the supervised row's ensemble; null: `ensemble` [ours]", ge=1, le=64)
    workers: Union[int, Literal["auto"]] = P("auto",
            "U-Nets trained at once, each in a single-thread process (auto: 2 on a CPU, 0 on a GPU; 0: one after "
            "another in this process)")


class EvaluationParams(Section):
    split: Split = P("test", "split the metrics are reported on")
    ground_truth_kind: Literal["masks", "boxes"] = P("masks",
            "masks, or boxes (masks/ hold box images: box IoU vs them)")
    auc_bins: int = P(10000, "bins of the streaming AUC-ROC", ge=2)
    figure_images: int = P(8, "images in figure grids", ge=0)
    grabcut: bool = P(True, "score Table 1's GrabCut baseline (cv2.grabCut from a centred rectangle) as row `grabcut`")
    grabcut_margin: float = P(0.02,
            "GrabCut: border outside the start rectangle, a fraction of each side (>= 1 px) [val: 0.02 "
            "best of 0.02-0.2 (IoU 0.579 vs 0.464 at 0.05); the baselines' papers give none]", ge=0, lt=0.5)
    grabcut_iterations: int = P(5,
            "GrabCut iterations [val: 3, 5 and 10 tie (1 is lower); 5 as in OpenCV's tutorial]", ge=1)


class AblationParams(Section):
    refine_with_m: bool = P(True, "stage 04 also refines the evaluation split with the pretrained m (does M need the "
                                 "fine-tuned m'?)")


class Config(Section):
    """All parameters of a run. Top-level keys are also the notebooks' papermill parameters."""
    run_dir: str = P("runs/toy", "run folder for all stage outputs (relative paths: project root)")
    seed: int = P(0, "global seed; per-image draws use (seed, stage, image id)")
    object: str = P("shape", "the object word; must appear in `prompt`")
    parts: list[str] = P([], "extra words in the prompt whose maps are summed with the object's")
    prompt: str = P("a photo of a {object}", "y_f; `{object}` is replaced by the object word")
    background_prompt: str = P("a photo of a background", "y_b")
    T0: int = P(40, "number of lowest DDIM noise levels averaged in stage 01 (1..50)")
    device: Literal["auto", "cpu", "cuda"] = P("auto", "auto, cpu or cuda")
    dtype: Literal["float32", "float16", "bfloat16"] = P("float32",
            "float32, float16 or bfloat16 (UNet and VAE weights)")
    model: ModelParams = Field(default_factory=ModelParams, description="the pretrained model m")
    dataset: DatasetParams = Field(default_factory=DatasetParams, description="the images")
    attention: AttentionParams = Field(default_factory=AttentionParams, description="stage 01")
    binarization: BinarizationParams = Field(default_factory=BinarizationParams, description="stage 02")
    finetune: FinetuneParams = Field(default_factory=FinetuneParams, description="stage 03")
    refinement: RefinementParams = Field(default_factory=RefinementParams, description="stage 04")
    synthesis: SynthesisParams = Field(default_factory=SynthesisParams, description="stage 05")
    segmentation: SegmentationParams = Field(default_factory=SegmentationParams, description="stage 06")
    evaluation: EvaluationParams = Field(default_factory=EvaluationParams, description="stage 06 metrics")
    ablation: AblationParams = Field(default_factory=AblationParams, description="ablations of the method's steps")

    @property
    def resolved_prompt(self) -> str:
        return self.prompt.replace("{object}", self.object)

    @property
    def words(self) -> list[str]:
        return [self.object, *self.parts]


SECTIONS = {name: f.annotation for name, f in Config.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
TOP_LEVEL_KEYS = tuple(Config.model_fields)
SCHEMA = {k: (dict(SECTIONS[k].model_fields) if k in SECTIONS else Config.model_fields[k])
          for k in TOP_LEVEL_KEYS}  # top-level name -> field (or section's fields); kept for callers
PATH_KEYS = ("run_dir", "dataset.root")


def describe(dotted: str) -> str:
    """The one-line doc of a dotted key."""
    node: Any = Config
    for part in dotted.split("."):
        field = node.model_fields[part]
        node = field.annotation
    return field.description or ""


def _closest(key: str, options) -> str:
    near = difflib.get_close_matches(key, list(options), n=1)
    return f" Did you mean `{near[0]}`?" if near else ""


def _type_name(model, dotted: str) -> str:
    ann = str(model)
    for name, say in (("Optional[", ""), ("typing.", ""), ("NoneType", "null"), ("Union[", ""),
                      ("Literal[", "one of ["), ("float", "float or int")):
        ann = ann.replace(name, say)
    return ann.rstrip("]") if "one of" not in ann else ann


def _error_message(err: dict, source: str) -> str:
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    node: Any = Config
    for p in loc[:-1]:
        node = node.model_fields[p].annotation if p in getattr(node, "model_fields", {}) else node
    key = loc[-1] if loc else ""
    dotted = ".".join(loc)
    fields = getattr(node, "model_fields", {})
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        return (f"{source}: unknown parameter `{dotted}`.{_closest(key, fields)} "
                f"Known keys here: {', '.join(fields)}.")
    if key in fields and isinstance(fields[key].annotation, type) and issubclass(fields[key].annotation, BaseModel):
        return f"{source}: `{dotted}` must be a section (mapping), got {value!r}."
    doc = fields[key].description if key in fields else ""
    if kind == "literal_error":
        return f"{source}: `{dotted}` is {value!r}; choose one of {err['ctx']['expected']}. ({doc})"
    if kind.startswith(("greater_than", "less_than")):
        return f"{source}: `{dotted}` is {value!r}; {err['msg'].lower()}. ({doc})"
    want = {"int": "int", "float": "float", "bool": "bool", "str": "str", "list": "list"}
    name = next((v for k, v in want.items() if kind.startswith(k)), kind)
    if key in fields and "None" in str(fields[key].annotation):
        name += " or null"
    return (f"{source}: `{dotted}` must be {name}, got {value!r} ({type(value).__name__}). "
            f"Fix the value; it means: {doc}.")


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def _check(cfg: Config, source: str) -> None:
    """Checks across keys (each key's own type and range is the schema's job)."""
    grid = cfg.attention.grid_steps
    if not 1 <= cfg.T0 <= min(50, grid):
        raise ParamsError(f"{source}: `T0` is {cfg.T0}; it must be between 1 and {min(50, grid)} "
                          f"(the lowest T0 of the {grid}-step DDIM grid; the paper uses 40).")
    if not cfg.prompt.strip():
        raise ParamsError(f"{source}: `prompt` is empty; use e.g. 'a photo of a {{object}}'.")
    if not cfg.object.strip():
        raise ParamsError(f"{source}: `object` is empty; set the object word, e.g. object: bird.")
    if "{object}" not in cfg.prompt and not _has_word(cfg.prompt, cfg.object):
        raise ParamsError(f"{source}: the object word `object`={cfg.object!r} is not in `prompt`="
                          f"{cfg.prompt!r}. Put the word (or `{{object}}`) into the prompt.")
    for word in cfg.parts:
        if not _has_word(cfg.resolved_prompt, word):
            raise ParamsError(f"{source}: `parts` word {word!r} is not in the prompt "
                              f"{cfg.resolved_prompt!r}. Add it to `prompt` or remove it from `parts`.")
    _check_work(cfg, source)


def _check_work(cfg: Config, source: str) -> None:
    """Values that would stop a run after work has started: no splits, no steps, no dataset folder."""
    ds = cfg.dataset
    if not ds.splits:
        raise ParamsError(f"{source}: `dataset.splits` is empty; list the splits the stages process, "
                          f"e.g. [train, test].")
    if len(set(ds.splits)) != len(ds.splits):
        raise ParamsError(f"{source}: `dataset.splits`={ds.splits} names a split twice.")
    if ds.kind != "toy" and not ds.root:
        raise ParamsError(f"{source}: `dataset.kind` is {ds.kind} but `dataset.root` is not set; set "
                          f"it to your dataset folder (--set dataset.root=DIR).")
    if ds.kind == "toy" and ds.n_train + ds.n_test < 1:
        raise ParamsError(f"{source}: `dataset.n_train` and `dataset.n_test` are both 0; the toy "
                          f"world needs images.")
    if ds.limit is not None and ds.limit < 1:
        raise ParamsError(f"{source}: `dataset.limit` is {ds.limit}; use a number >= 1 or null.")
    steps = cfg.finetune.max_train_steps
    if steps is not None and steps < 1:
        raise ParamsError(f"{source}: `finetune.max_train_steps` is {steps}; stage 03 needs a "
                          f"positive number of optimizer steps (params/toy.yaml uses 1500).")
    if cfg.synthesis.n_images == 0 and "unet_D_s_plus_synth" in cfg.segmentation.rows:
        rows = [r for r in cfg.segmentation.rows if r != "unet_D_s_plus_synth"]
        raise ParamsError(f"{source}: `synthesis.n_images` is 0, so there is no D' for the row "
                          f"unet_D_s_plus_synth of `segmentation.rows`; drop that row (--set "
                          f"'segmentation.rows=[{','.join(rows)}]') or synthesize images (null: as "
                          f"many as the training split).")


def resolved_prompt(cfg: Config, prompt: str | None = None) -> str:
    return (prompt or cfg.prompt).replace("{object}", cfg.object)


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", yaml-parsed value)."""
    if "=" not in item:
        raise ParamsError(f"--set {item!r}: expected KEY=VALUE, e.g. --set dataset.seed=1")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str):  # YAML 1.1 reads "3e-5" as a string; numbers are meant
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return key.strip(), value


def _nest(dotted: str, value) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _deep_merge(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def _validate(data: dict, source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ParamsError(_error_message(e.errors()[0], source)) from None


def resolve_path(value: str | None, base: Path = PROJECT_ROOT) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def resolve_input(value: str) -> str:
    """An input path as the parameter file's: the working directory, then the project root."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists() or not (PROJECT_ROOT / p).exists():
        return str(p.resolve())
    return str((PROJECT_ROOT / p).resolve())


def relative_to_project(value: str | None) -> str | None:
    """A path as written relative to the project root where it lies inside it (portable fingerprints)."""
    if value is None:
        return None
    try:
        return str(Path(value).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(value)


def read_params_file(path: str | Path) -> tuple[Path, dict]:
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and (PROJECT_ROOT / path).is_file():
        path = PROJECT_ROOT / path  # relative paths: the working directory, then the project root
    if not path.is_file():
        raise ParamsError(f"parameter file {path} does not exist; pass one of params/*.yaml.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e}). Fix the syntax.") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of parameters.")
    return path, data


def load_params(path: str | Path | None = None, overrides=(), run_dir: str | None = None) -> Config:
    """Defaults <- YAML file <- overrides (`key=value` strings, or a dict of dotted or top-level keys
    whose section values are dicts merged over the defaults); validated. Relative paths are
    resolved against the project root."""
    data: dict = {}
    source = "parameters"
    if path is not None:
        path, data = read_params_file(path)
        source = str(path)
        _validate(data, source)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        _deep_merge(data, _nest(key, value))
        _validate(data, f"override {key}={value!r}")
    if run_dir is not None:
        data["run_dir"] = str(run_dir)
    cfg = _validate(data, source)
    _check(cfg, source)
    cfg.run_dir = resolve_path(cfg.run_dir)
    cfg.dataset.root = resolve_path(cfg.dataset.root)
    local_model = Path(resolve_path(cfg.model.path))
    if local_model.exists():
        cfg.model.path = str(local_model)
    if cfg.model.config is not None:
        cfg.model.config = resolve_path(cfg.model.config)
    return cfg


def save_params(cfg: Config | dict, path: str | Path) -> None:
    from fgbg_utils.io import atomic_write_text
    data = cfg.model_dump() if isinstance(cfg, BaseModel) else cfg
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
