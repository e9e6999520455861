# make demo: create .venv if missing, install, run the default toy pipeline headless (runs/toy),
#            stages 01-06, then write runs/toy/report.html.
# make test: install what the tests need and run them (unit tests + nbval on notebooks 01-06).
# make lab:  open JupyterLab on notebooks/ with the project's environment.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# one busy process at a time here; passive OpenMP waits keep parallel jobs from spinning
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1
export PYTHONHASHSEED := 0

INSTALLED      := $(VENV)/.installed-runtime
TEST_INSTALLED := $(VENV)/.installed-test
NBVAL := $(sort $(wildcard notebooks/0[1-9]_*.ipynb))

.PHONY: demo test lab notebooks benchmark clean install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(INSTALLED): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(TEST_INSTALLED): requirements-test.txt $(INSTALLED)
	$(BIN)/python -m pip install -q -r requirements-test.txt
# only for its CLIP BPE file (tests/fixtures/real_clip.py); --no-deps: no torchvision, no CUDA torch
	$(BIN)/python -m pip install -q --no-deps open-clip-torch==3.3.0
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/python -m fgbg_utils run params/toy.yaml --out runs/toy
	$(BIN)/python -m fgbg_utils report runs/toy

test: $(TEST_INSTALLED)
	$(BIN)/python -m pytest -q tests $(NBVAL) --nbval-lax --nbval-current-env

lab: $(INSTALLED)
	$(BIN)/python -m pip install -q jupyterlab
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (fgbg .venv)"
	cd notebooks && ../$(BIN)/jupyter lab

# Regenerate the notebooks from tools/build_notebooks.py and store their small outputs.
notebooks: $(TEST_INSTALLED)
	rm -rf runs/notebook
	$(BIN)/python tools/build_notebooks.py --execute

benchmark: $(INSTALLED)
	$(BIN)/python benchmarks/extraction.py
	$(BIN)/python benchmarks/finetune.py

clean:
	rm -rf runs .cache
