# Two commands for a fresh Debian/Ubuntu machine (as root): `make demo` and `make test`.
VENV := .venv
PYTHON ?= python3

.PHONY: demo test system-deps test-deps venv

system-deps:
	@scripts/system-deps.sh

# The tests also boot EC2 twin instances (systemd, cloud-init), run OpenMPI across local hosts (mpicc builds
# a ring that talks over the hosts' own links, and the mpi_pi example), and run Dask there from a Python
# environment the hosts can see (/opt/cloister/hosts-venv: outside every home and /tmp, wherever the
# repository is cloned).
test-deps:
	@scripts/system-deps.sh openmpi-bin libopenmpi-dev python3-venv
	@scripts/twin-deps.sh
	@scripts/hosts-venv.sh /opt/cloister/hosts-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: system-deps venv
	scripts/demo.sh

# The same cluster life as on AWS, against the EC2 twin on this machine (no AWS account, loopback only).
.PHONY: demo-ec2
demo-ec2: system-deps venv
	@scripts/twin-deps.sh
	scripts/demo-ec2.sh

test: test-deps venv
	$(VENV)/bin/python -m pytest -q
