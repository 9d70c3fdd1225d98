# tf_medseg: set-up, tests, demo and benchmarks. Every target that runs code depends on the venv,
# whose stamps make a second `make` a no-op for what is already installed.
#
# PROFILE=paper (the default): .venv on Python 3.11 with the paper's stack, TensorFlow 2.15.1,
# tensorflow-addons 0.23.0 and Horovod 0.28.1 built with Gloo.
# PROFILE=modern: .venv-modern on Python 3.12 with TensorFlow 2.21 and tf-keras 2.21 (Keras 2),
# NumPy 2, no tensorflow-addons and no Horovod (tf.distribute instead).
PROFILE ?= paper
HOROVOD_VERSION := 0.28.1
DEMO_DATA ?= data/synthetic_spleen
DEMO_WORKDIR ?= runs/demo

# A Python of the given minor version: on PATH, or pyenv's newest of that series.
find_python = $(shell for p in python$(1) "$$(pyenv root 2>/dev/null)/versions/$$(pyenv latest $(1) 2>/dev/null)/bin/python$(1)"; do "$$p" -c "import sys; print(sys.executable)" 2>/dev/null && break; done)

ifeq ($(PROFILE),paper)
PYTHON ?= $(or $(call find_python,3.11),python3)
VENV := .venv
EXTRAS := paper,test,horovod,bench
STAMPS := $(VENV)/.installed $(VENV)/.horovod
else ifeq ($(PROFILE),modern)
PYTHON ?= $(or $(call find_python,3.12),$(error PROFILE=modern needs Python 3.12 (python3.12 on PATH or in pyenv); or set PYTHON=))
VENV := .venv-modern
EXTRAS := modern,test,bench
STAMPS := $(VENV)/.installed
else
$(error PROFILE must be paper or modern, not '$(PROFILE)')
endif
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: venv test demo bench bench-msd bench-msd-more bench-plateau lint format clean

venv: $(STAMPS)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=23.2" wheel "setuptools<70"

$(VENV)/.installed: setup.py $(VENV)/bin/python
	$(PIP) install -e ".[$(EXTRAS)]"
	$(PY) -m tf_medseg.stack
	touch $@

# Horovod is compiled against the TensorFlow in the venv, so it cannot use build isolation.
# HOROVOD_WITH_TENSORFLOW=1 makes the build fail (not skip) when TensorFlow cannot be found;
# the import check after it fails loudly if the TensorFlow or Gloo parts are missing.
$(VENV)/.horovod: $(VENV)/.installed
	HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
	HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS= \
	$(PIP) install --no-build-isolation --no-cache-dir horovod==$(HOROVOD_VERSION)
	$(PY) -c "import horovod, horovod.tensorflow as hvd; assert hvd.gloo_built(), 'Horovod built without Gloo'; print('horovod', horovod.__version__, 'with Gloo')"
	touch $@

# The suite runs on TEST_WORKERS processes (pytest-xdist; 0: in this one). Most tests spend
# their time in single-threaded Python (TensorFlow's import, tiny graphs, subprocesses), so two
# workers keep both cores of a small machine busy.
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

# The demo trains from scratch each time (its workdir is removed first); the data is kept.
demo: venv
	test -f $(DEMO_DATA)/dataset.json || $(PY) -m tf_medseg.cli.synth --task=spleen \
		--out=$(DEMO_DATA) --num_train=16 --num_test=2 --size=96 --seed=0
	rm -rf $(DEMO_WORKDIR)
	$(PY) -m tf_medseg.cli.train --preset=synthetic_spleen \
		--data_dir=$(DEMO_DATA) --workdir=$(DEMO_WORKDIR)

# Benchmarks print tables and write JSON (and plots) to runs/bench/. Run on a quiet machine
# (1 h 06 min on 2 cores, 2026-11-30). Each time-to-Dice run is capped at BENCH_MINUTES (a run that
# never reaches the target counts with its cap); baseline and proposed run with three seeds
# (medians), the ablations (one ingredient added to the baseline or removed from the proposed
# preset) with one, their speed-up taken against the median baseline. At MSD size (30 generated
# spleen volumes of 512 x 512 x 31-168 voxels) baseline, proposed and baseline+cache run once,
# capped at BENCH_MSD_MINUTES; `make bench-msd-more` runs the other MSD-size ablations and the
# heart at MSD size.
# The README's time-to-Dice tables were measured with the paper's sampler (the default before
# issue #19's warm-up, damping and floor): their commands run with --sampler=paper. The liver's
# runs, which no table shows, use the package's sampler (the presets' own).
BENCH_MINUTES ?= 4
BENCH_MSD_MINUTES ?= 12
BENCH_SEEDS ?= 0,1,2
REMOVED := proposed-cache,proposed-novograd,proposed-instance_norm,proposed-adaptive
ADDED := baseline+cache,baseline+novograd,baseline+instance_norm,baseline+adaptive
TTD := $(PY) -m tf_medseg.bench.time_to_dice --max_minutes_per_run=$(BENCH_MINUTES)
PAPER_SAMPLER := --sampler=paper
bench: venv
	$(PY) -m tf_medseg.bench.pipeline --json=runs/bench/pipeline.json
	$(PY) -m tf_medseg.bench.models --policies=float32 --json=runs/bench/models_float32.json
	$(PY) -m tf_medseg.bench.models --models=segresnet,unet3d --policies=mixed_bfloat16 \
		--repeats=2 --json=runs/bench/models_bfloat16.json
	$(PY) -m tf_medseg.bench.inference --json=runs/bench/inference.json
	for task in spleen liver; do \
		test -f data/msd_$$task/dataset.json || $(PY) -m tf_medseg.cli.synth --task=$$task \
			--geometry=msd --out=data/msd_$$task --num_train=4 --num_test=0 --seed=0; \
		$(PY) -m tf_medseg.bench.prefix --data_dir=data/msd_$$task \
			--json=runs/bench/prefix_$$task.json || exit 1; \
	done
	$(TTD) $(PAPER_SAMPLER) --task=spleen --configs=baseline,proposed --seeds=$(BENCH_SEEDS) \
		--json=runs/bench/time_to_dice_spleen.json
	$(TTD) $(PAPER_SAMPLER) --task=spleen --configs=$(REMOVED),$(ADDED),proposed+bf16 \
		--baseline_json=runs/bench/time_to_dice_spleen.json \
		--json=runs/bench/time_to_dice_spleen_ablations.json
	$(TTD) $(PAPER_SAMPLER) --task=heart --configs=baseline,proposed --seeds=$(BENCH_SEEDS) \
		--json=runs/bench/time_to_dice_heart.json
	$(TTD) --task=liver --configs=baseline,proposed --seeds=$(BENCH_SEEDS) \
		--json=runs/bench/time_to_dice_liver.json
	$(TTD_MSD) $(PAPER_SAMPLER) --task=spleen --configs=baseline,proposed,baseline+cache \
		--json=runs/bench/time_to_dice_spleen_msd.json
	$(PY) -m tf_medseg.bench.pipeline --data_dir=runs/bench/time_to_dice/data_spleen_msd \
		--json=runs/bench/pipeline_msd.json

TTD_MSD := $(PY) -m tf_medseg.bench.time_to_dice --geometry=msd --seeds=0 \
	--max_minutes_per_run=$(BENCH_MSD_MINUTES)
# The Decathlon-size table of the README: the proposed preset and the baseline on the spleen
# and the heart at the MSD geometry, 3 seeds each, each run timed to the Dice in the labels' own
# geometry and capped at BENCH_MSD_MINUTES (up to 2 x 6 x 12 minutes on 2 cores); the JSON is
# copied to docs/bench/ and the README's rendered tables are rendered again.
bench-msd: venv
	for task in spleen heart; do \
		$(PY) -m tf_medseg.bench.time_to_dice --geometry=msd --task=$$task \
			--configs=proposed,baseline --seeds=$(BENCH_SEEDS) \
			--max_minutes_per_run=$(BENCH_MSD_MINUTES) \
			--json=runs/bench/time_to_dice_$${task}_msd_native.json || exit 1; \
		cp runs/bench/time_to_dice_$${task}_msd_native.json docs/bench/time_to_dice_$${task}_msd.json; \
	done
	$(PY) -m tf_medseg.bench.render

# The plateau stop and the schedule on the synthetic spleen and heart, 3 seeds each, and a
# 10-minute run without the stop (about 80 minutes on 2 cores); the README's table is
# docs/bench/plateau_stop.json, printed by `python -m tf_medseg.bench.plateau_stop --from_json=`.
bench-plateau: venv
	$(PY) -m tf_medseg.bench.plateau_stop --tasks=spleen,heart --seeds=0,1,2 \
		--configs=decay,constant,reference --reference_seeds=0 --reference_minutes=10 \
		--json=runs/bench/plateau_stop.json

# The MSD-size ablations and the heart at MSD size (about an hour on 2 cores, 2026-12-01);
# the ablations take their speed-up against `make bench`'s MSD-size baseline.
bench-msd-more: venv
	$(TTD_MSD) $(PAPER_SAMPLER) --task=spleen \
		--configs=proposed-cache,proposed-novograd,proposed-adaptive,proposed+instance_norm \
		--baseline_json=runs/bench/time_to_dice_spleen_msd.json \
		--json=runs/bench/time_to_dice_spleen_msd_ablations.json
	$(TTD_MSD) $(PAPER_SAMPLER) --task=heart --configs=baseline,proposed \
		--json=runs/bench/time_to_dice_heart_msd.json

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info
