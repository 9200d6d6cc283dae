#!/bin/bash
# Rebuild every reference artifact with the scripts' defaults (the committed weights' settings).
# Usage (repo root): DEVICE=cuda bash dq/reference/rebuild.sh   (the committed set was built on one H200)
set -eu
A="--device ${DEVICE:-cpu} --threads ${THREADS:-4} --overwrite"
python -m dq.reference.train_vae $A &
python -m dq.reference.train_vae --video $A &
python -m dq.reference.train_clip $A &
wait
python -m dq.reference.train_sd $A &
python -m dq.reference.train_pixart $A &
python -m dq.reference.train_video $A &
wait
du -sh dq/reference/weights
