# Everything runs inside .venv, created on first use. torch is pinned to the CPU build on disk here;
# see pyproject.toml for why the package itself only sets a lower bound.
PY      := .venv/bin/python
STAMP   := .venv/.installed
TORCH   := torch==2.13.0

.PHONY: demo test test-slow lint format bench shapes-model shapes-controlnet clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,train,serve]'
	# open_clip for `sana captions score` tests: --no-deps because it requires torchvision, which has no
	# build for this CPU torch; the scorer never uses torchvision (see sana/data/captions.py).
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	$(PY) -m pip install -q ftfy regex
	# Bytecode now: with PYTHONDONTWRITEBYTECODE set (as on CI machines) every `sana` start would recompile it.
	$(PY) -m compileall -q sana
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sana demo --out out/demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

bench: $(STAMP)
	$(PY) benchmarks/bench_models.py

# The shipped model from nothing (data, text encoder, autoencoder, cache, DiT, fp16 export into
# sana/assets/shapes-model); resumable: run it again after an interruption. See sana/shapes/build.py.
shapes-model: $(STAMP)
	$(PY) -m sana.shapes.build

# The shipped edge ControlNet (docs/shapes.md, "The edge ControlNet"): 5,120 fresh scenes, their Canny edge maps
# made while caching, 3,000 steps with the shipped model frozen, the float16 export copied into
# sana/assets/shapes-controlnet. Resumable: run it again after an interruption.
shapes-controlnet: $(STAMP)
	test -f data/shapes-edges/manifest.jsonl || $(PY) -m sana data shapes --n 5120 --seed 97 --out data/shapes-edges
	$(PY) -m sana cache data/shapes-edges/manifest.jsonl --model sana/assets/shapes-model \
		--out data/shapes-edges-cache --resolution 256 --no-buckets --control edges
	$(PY) -m sana train configs/train/shapes_controlnet.yaml --resume
	mkdir -p sana/assets/shapes-controlnet
	cp runs/shapes-controlnet/final/controlnet/config.json \
		runs/shapes-controlnet/final/controlnet/diffusion_pytorch_model.safetensors sana/assets/shapes-controlnet/

clean:
	rm -rf .venv out .pytest_cache .ruff_cache
