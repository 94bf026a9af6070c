# Two entry points for a fresh machine: `make demo` and `make test`. Both install into .venv first.
#
# Installs follow requirements/lock.txt, a constraints file compiled from pyproject.toml's ranges: every
# package has one version, so pip never searches (unpinned, pip 26 backtracks for over an hour on the
# test extras). `make demo` installs the runtime dependencies only; `make test` adds the test extras.
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
PIP := $(PY) -m pip install -q --disable-pip-version-check -c $(LOCK)

.PHONY: install install-test demo test lock lock-check clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	@# an existing environment is updated, not recreated (python3 may now be another interpreter)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@echo "installing Curate's runtime dependencies into $(VENV) (about 3 minutes; 6.5 GB, 4 GB of them torch's CUDA libraries)"
	$(PIP) -e .
	$(PY) requirements/check_lock.py --installed
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	@echo "installing the test extras into $(VENV)"
	$(PIP) -e '.[test]'
	$(PY) requirements/check_lock.py --installed
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/curate synth --out demo/pool --samples 2000 --seed 0
	$(PY) pipeline/curate.py --config jobs/quickstart.yaml
	@echo "(the curate command is $(VENV)/bin/curate; 'source $(VENV)/bin/activate' puts it on the PATH)"

# Two pytest workers, a test file each: about a quarter of a single run's time goes to waiting (Ray
# scheduling, process starts), which the other worker fills. More workers than cores only contend.
test: install-test lock-check
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25

# Recompile the lock from pyproject.toml's ranges and requirements/pins.in (needs uv, from PyPI).
lock:
	test -x $(VENV)/bin/uv || $(PY) -m pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip compile pyproject.toml --all-extras --universal --python-version 3.10 \
	    -c requirements/pins.in --custom-compile-command "make lock" -q -o $(LOCK)

# Fails when pyproject.toml or requirements/pins.in asks for something the lock does not hold.
lock-check: install
	$(PY) requirements/check_lock.py

clean:
	rm -rf demo runs
