"""Parameter files are validated before any work: unknown keys, wrong types and bad values fail
with a message naming the key and the file."""
import pytest
import yaml

from fgbg_utils.runs.params import ParamsError, load_params


def write(tmp_path, data, name="p.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_and_file_merge(tmp_path):
    cfg = load_params(write(tmp_path, {"T0": 10, "dataset": {"seed": 3}}))
    assert cfg.T0 == 10 and cfg.dataset.seed == 3
    assert cfg.dataset.n_train == 96  # untouched default
    assert cfg.run_dir.startswith("/")   # resolved


@pytest.mark.parametrize("data,needle", [
    ({"TO": 40}, "unknown parameter `TO`"),
    ({"dataset": {"sed": 1}}, "unknown parameter `dataset.sed`"),
    ({"T0": "forty"}, "`T0` must be int"),
    ({"T0": True}, "`T0` must be int"),
    ({"dataset": {"kind": "imagenet"}}, "`dataset.kind`"),
    ({"dataset": "toy"}, "must be a section"),
    ({"T0": 51}, "between 1 and 50"),
    ({"T0": 0}, "between 1 and 50"),
    ({"object": "bird", "prompt": "a photo of a dog"}, "not in `prompt`"),
    ({"prompt": "a photo of a {object}", "parts": ["wings"]}, "`parts` word 'wings'"),
])
def test_bad_files_name_key_and_file(tmp_path, data, needle):
    p = write(tmp_path, data, "bad.yaml")
    with pytest.raises(ParamsError) as e:
        load_params(p)
    assert needle in str(e.value)
    assert "bad.yaml" in str(e.value)


def test_suggests_close_key(tmp_path):
    with pytest.raises(ParamsError, match="Did you mean `seed`"):
        load_params(write(tmp_path, {"dataset": {"sed": 1}}))


def test_overrides_dotted_and_typed(tmp_path):
    cfg = load_params(write(tmp_path, {}), ["dataset.seed=7", "attention.sweep=false", "T0=12"])
    assert cfg.dataset.seed == 7 and cfg.attention.sweep is False and cfg.T0 == 12
    with pytest.raises(ParamsError, match="override dataset.sed"):
        load_params(write(tmp_path, {}), ["dataset.sed=7"])
    with pytest.raises(ParamsError, match="KEY=VALUE"):
        load_params(write(tmp_path, {}), ["dataset.seed"])


def test_int_accepted_for_float(tmp_path):
    cfg = load_params(write(tmp_path, {"dataset": {"test_fraction": 1}}))
    assert cfg.dataset.test_fraction == 1.0


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("T0: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


@pytest.mark.parametrize("name", ["toy.yaml", "cub.yaml", "folder.yaml"])
def test_shipped_params_are_valid(name):
    from fgbg_utils.runs.params import PROJECT_ROOT
    cfg = load_params(PROJECT_ROOT / "params" / name)
    assert cfg.object in cfg.prompt.replace("{object}", cfg.object)


def test_override_scientific_notation(tmp_path):
    cfg = load_params(write(tmp_path, {}), ["finetune.learning_rate=3e-5", "object=shape"])
    assert cfg.finetune.learning_rate == 3e-5 and cfg.object == "shape"


def test_a_bare_yaml_no_is_the_mixed_precision_no():
    from fgbg_utils.runs.params import PROJECT_ROOT
    TOY = PROJECT_ROOT / "params" / "toy.yaml"
    # YAML reads `no` as false; `mixed_precision: no` in a file or --set means "no"
    cfg = load_params(TOY, ["segmentation.mixed_precision=no", "finetune.mixed_precision=no"])
    assert cfg.segmentation.mixed_precision == "no" and cfg.finetune.mixed_precision == "no"
    assert load_params(TOY, ["segmentation.mixed_precision=bf16"]).segmentation.mixed_precision == "bf16"
    with pytest.raises(ParamsError, match="segmentation.mixed_precision"):
        load_params(TOY, ["segmentation.mixed_precision=yes"])


def test_no_synthetic_images_with_the_synthetic_row_is_refused_naming_the_fix():
    from fgbg_utils.runs.params import PROJECT_ROOT
    TOY = PROJECT_ROOT / "params" / "toy.yaml"
    with pytest.raises(ParamsError, match=r"synthesis.n_images.*unet_D_s_plus_synth.*"
                                          r"segmentation.rows=\[unet_M_pre,unet_D_s,supervised\]"):
        load_params(TOY, ["synthesis.n_images=0"])
    rows = load_params(TOY, ["synthesis.n_images=0", "segmentation.rows=[unet_D_s]"]).segmentation.rows
    assert rows == ["unet_D_s"]
