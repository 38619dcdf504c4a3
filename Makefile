# Two commands on a fresh machine: `make test` (the linter, then the tests) and `make train`
# (ARGS=configs/laptop_ar.yaml for AR).
# Both first create .venv, or refill it when requirements.txt is newer than its stamp.
.PHONY: test train

test: .venv/.installed
	.venv/bin/ruff check .
	.venv/bin/python -m pytest

train: .venv/.installed
	.venv/bin/python train.py $(ARGS)

.venv/.installed: requirements.txt
	python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && \
	.venv/bin/pip install -q -r requirements.txt && touch $@

# The laptop-scale embedded assets, rebuilt on 2 CPU cores: `make -j2 assets` (two stages at a time, one
# thread each). A finished stage's file is kept (delete it to redo the stage); an interrupted stage resumes
# from its last evaluation (<file>.resume.pt). Order: tokenizers, then IDMs trained on their round trips,
# then the base world models, evaluated by those IDMs. Measured on 2 cores: vq 7 min beside ae 18 min, the two
# IDMs 10 min at once, ar_base 21 min beside nfd_base 20 min: about 1 hour in all.
L := assets/laptop
PRE := .venv/bin/python pretrain.py
ONE = --run.threads=1 --pretrain.out=$@
.PHONY: assets
assets: $(L)/vq.pt $(L)/ae.pt $(L)/idm_reward.pt $(L)/idm_judge.pt $(L)/ar_base.pt $(L)/nfd_base.pt

$(L)/vq.pt: | .venv/.installed
	$(PRE) vq configs/laptop_ar.yaml $(ONE) --data.max_clips=2000 --pretrain.steps=1500 --pretrain.batch_size=4 \
		--pretrain.eval_every=300 --pretrain.eval_clips=32
$(L)/ae.pt: | .venv/.installed
	$(PRE) ae configs/laptop_nfd.yaml $(ONE) --data.max_clips=2000 --pretrain.steps=1500 --pretrain.batch_size=4 \
		--pretrain.eval_every=300 --pretrain.eval_clips=32
$(L)/idm_%.pt: $(L)/vq.pt $(L)/ae.pt assets/minicraft/idm_%.pt
	$(PRE) idm configs/laptop_idm_$*.yaml $(ONE) --pretrain.init_from=assets/minicraft/idm_$*.pt \
		--pretrain.steps=1500 --pretrain.batch_size=8 --pretrain.lr=2e-4 --pretrain.warmup=50 \
		--pretrain.eval_every=500 --pretrain.eval_clips=64
$(L)/ar_base.pt: $(L)/vq.pt $(L)/idm_reward.pt $(L)/idm_judge.pt
	$(PRE) ar configs/laptop_ar.yaml $(ONE) --data.max_clips=4000 --data.seed=3 --pretrain.steps=900 \
		--pretrain.batch_size=8 --pretrain.eval_every=150 --pretrain.eval_clips=32
$(L)/nfd_base.pt: $(L)/ae.pt $(L)/idm_reward.pt $(L)/idm_judge.pt
	$(PRE) nfd configs/laptop_nfd.yaml $(ONE) --data.max_clips=4000 --data.seed=4 --pretrain.steps=1400 \
		--pretrain.batch_size=8 --pretrain.eval_every=350 --pretrain.eval_clips=32

# The minicraft IDMs the laptop IDMs start from (docs/2026-11-22-embedded-idms.md: four stages on fresh
# worlds, ~95 min on one core each). Only run when the file is missing.
M := assets/minicraft
$(M)/idm_reward.pt $(M)/idm_judge.pt: $(M)/idm_%.pt: | .venv/.installed
	$(PRE) idm configs/pretrain_idm_$*.yaml --run.threads=1 --pretrain.out=/tmp/idm_$*_1.pt --pretrain.steps=2000
	$(PRE) idm configs/pretrain_idm_$*.yaml --run.threads=1 --pretrain.out=/tmp/idm_$*_2.pt \
		--pretrain.init_from=/tmp/idm_$*_1.pt --pretrain.steps=2500 --pretrain.lr=4e-4
	$(PRE) idm configs/pretrain_idm_$*.yaml --run.threads=1 --pretrain.out=/tmp/idm_$*_3.pt \
		--pretrain.init_from=/tmp/idm_$*_2.pt --data.seed=$(if $(findstring reward,$*),11,12) --data.max_clips=8000 \
		--pretrain.steps=3500 --pretrain.lr=3e-4
	$(PRE) idm configs/pretrain_idm_$*.yaml --run.threads=1 --pretrain.out=$@ --pretrain.init_from=/tmp/idm_$*_3.pt \
		--data.seed=$(if $(findstring reward,$*),21,22) --data.max_clips=8000 --pretrain.steps=2400 --pretrain.lr=2e-4 \
		--pretrain.eval_every=400
