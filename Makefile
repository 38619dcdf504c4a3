# Two commands on a fresh machine: `make test` and `make train` (ARGS=configs/minicraft_ar.yaml for AR).
# Both first create .venv, or refill it when requirements.txt is newer than its stamp.
.PHONY: test train

test: .venv/.installed
	.venv/bin/python -m pytest

train: .venv/.installed
	.venv/bin/python train.py $(ARGS)

.venv/.installed: requirements.txt
	python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && \
	.venv/bin/pip install -q -r requirements.txt && touch $@
