# Two entry points for a fresh machine: `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	# an existing environment is updated, not recreated (python3 may now be another interpreter)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	# torch and torchvision pinned as a pair (torchvision must match torch's build)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/curate synth --out demo/pool --samples 2000 --seed 0
	$(PY) pipeline/curate.py --config jobs/quickstart.yaml

# Two pytest workers, a test file each: about a quarter of a single run's time goes to waiting (Ray
# scheduling, process starts), which the other worker fills. More workers than cores only contend.
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf demo runs
