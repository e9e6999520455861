"""Bad input through the CLI: a clear message naming the key/file and the fix, exit code 2, and no
work done (no run folder written)."""
import numpy as np
from PIL import Image

from fgbg_utils.runs.cli import main
from fgbg_utils.runs.params import PROJECT_ROOT

TOY = str(PROJECT_ROOT / "params" / "toy.yaml")


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_unknown_key_fails_before_work(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(["run", TOY, "--set", "datset.seed=1", "--out", str(out)], capsys)
    assert code == 2 and "unknown parameter `datset`" in err and "Did you mean `dataset`" in err
    assert not out.exists()


def test_wrong_type_and_T0_range(tmp_path, capsys):
    code, err = run_cli(["run", TOY, "--set", "T0=abc", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "`T0` must be int" in err
    code, err = run_cli(["run", TOY, "--set", "T0=60", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "between 1 and 50" in err


def test_object_word_not_in_prompt(tmp_path, capsys):
    code, err = run_cli(["run", TOY, "--set", "object=bird", "--set", "prompt=a photo of a cat",
                         "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "'bird' is not in `prompt`" in err


def test_missing_and_empty_dataset(tmp_path, capsys):
    missing = tmp_path / "nothing"
    code, err = run_cli(["run", TOY, "--set", "dataset.kind=folder", "--set", f"dataset.root={missing}",
                         "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and str(missing) in err and "dataset.root" in err
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    code, err = run_cli(["run", TOY, "--set", "dataset.kind=folder", "--set", f"dataset.root={empty}",
                         "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "images" in err


def test_unknown_stage(tmp_path, capsys):
    code, err = run_cli(["run", TOY, "--stages", "09", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "unknown stage" in err


def test_word_unknown_to_tokenizer(tmp_path, capsys):
    """The toy model's tokenizer has no word 'bird': refused before any notebook runs."""
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "images" / "a.png")
    code, err = run_cli(["run", TOY, "--set", "object=bird", "--set", "dataset.kind=folder",
                         "--set", f"dataset.root={folder}", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "unknown to this model's tokenizer" in err


def test_bad_model_path(tmp_path, capsys):
    code, err = run_cli(["run", TOY, "--set", f"model.path={tmp_path / 'no-model'}",
                         "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "model.path" in err


def test_empty_evaluation_split_refused_before_work(tmp_path, capsys):
    out = tmp_path / "r"
    code, err = run_cli(["run", TOY, "--set", "dataset.splits=[train]", "--set", "dataset.n_train=2",
                         "--out", str(out)], capsys)
    assert code == 2 and "`evaluation.split`='test'" in err and "dataset.splits" in err
    assert not (out / "01_attention_maps").exists()


def test_report_of_an_empty_folder(tmp_path, capsys):
    code, err = run_cli(["report", str(tmp_path)], capsys)
    assert code == 2 and "no executed notebooks" in err


def test_stage_command_names_the_missing_stage(tmp_path, capsys):
    code, err = run_cli(["stage", "06", TOY, "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and ("stage 06 (evaluation) needs the outputs of stage 01_attention_maps, "
                          "02_binarization, 03_finetuning, 04_refinement, 05_synthesis") in err
    assert "notebooks/03_finetuning.ipynb" in err and "--stages 01,02,03,04,05" in err
    code, err = run_cli(["stage", "05", TOY, "--out", str(tmp_path / "r")], capsys)
    # stage 05 refines D' in memory: it needs m' (03), not stage 04's outputs
    assert code == 2 and "03_finetuning" in err and "--stages 01,02,03 " in err and "04_refinement" not in err
