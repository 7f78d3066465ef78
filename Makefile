# ses-mailer-ops: the two README commands are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        ?= .venv
PY          := $(VENV)/bin/python
BIN         := $(VENV)/bin
APT_PKGS    := systemd-container debootstrap openssh-client iproute2 rsync
# Every process started from here talks to loopback only.
export AWS_EC2_METADATA_DISABLED := true
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
# molecule and ansible-lint call ansible-* by name: the venv comes first.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help deps apt venv lint pytest molecule test demo lab-up lab-down bench

help:
	@echo "make demo   - build the lab and show the whole chain (README command 1)"
	@echo "make test   - lint, pytest and every molecule scenario (README command 2)"
	@echo "make lab-up / make lab-down / make bench"

# Debian packages the lab needs; installed only when missing.
apt:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(BIN)/pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

deps: apt venv

lint: venv
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint --profile production
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/vermin -t=3.9- --no-tips --violations files/ses_mailer.py

pytest: deps
	$(BIN)/pytest

molecule: deps
	cd $(CURDIR) && for s in iam default e2e; do \
	  [ -d molecule/$$s ] || continue; \
	  $(BIN)/molecule test -s $$s || exit 1; \
	done

# One summary line at the end ("summary: N passed, N failed") for CI.
test: deps
	bash tools/test-all.sh

lab-up: deps
	$(PY) lab/labctl.py up

lab-down: venv
	$(PY) lab/labctl.py down

demo: deps
	$(PY) lab/demo.py

bench: deps
	$(PY) bench/run.py
