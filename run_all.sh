#!/usr/bin/env bash
# The whole CASS study, resumable: a thin wrapper around study/run_all.py (the planner).
#
#   bash run_all.sh quick                     # synthetic miniature on CPU (< 15 min on 2 cores)
#   BRAIN_MRI_ROOT=/data/brain-mri bash run_all.sh cpu   # the brain-MRI study on real data (CPU, < 2 h)
#   HAM10000_ROOT=/data/ham10000 bash run_all.sh cpu-ham10000   # the same study on HAM10000 (about 2 h, estimated)
#   PBC_ROOT=/data/pbc bash run_all.sh cpu-pbc                   # on PBC (about 2 h, estimated)
#   PBC_ROOT=/data/pbc bash run_all.sh cpu-pbc200                # on a 200-image PBC training subset (about 2 h)
#   PBC_ROOT=/data/pbc bash run_all.sh claim5-small-data         # the claims ledger (results/claims.md): claims
#   PBC_ROOT=/data/pbc bash run_all.sh claim3-batch              #   3-6 on the 200-image PBC subset; claims 3, 4
#   PBC_ROOT=/data/pbc bash run_all.sh claim4-epochs             #   and 6 share runs/claims-pbc200-val500 (times:
#   PBC_ROOT=/data/pbc bash run_all.sh claim6-ablations          #   docs/run_all.md, "The claim modes")
#   BRAIN_MRI_ROOT=/data/brain-mri bash run_all.sh claim3-batch-mri  # claim 3 on brain MRI as Table 6 (47 min)
#   bash run_all.sh paper                     # the paper's tables and figures on the real data (GPU)
#   bash run_all.sh paper table1 table6 fig2  # only these
#   bash run_all.sh paper --dry-run           # list the plan, run nothing (or DRY_RUN=1 bash run_all.sh ...)
#
# Data roots (paper mode): ISIC_ROOT, BRAIN_MRI_ROOT, DERMOFIT_ROOT, AUTOIMMUNE_CSV, or the flags
# --isic-root, --brain-mri-root, --dermofit-root, --autoimmune-csv. Tables whose data is not given
# are skipped with a message. The cpu-ham10000 / cpu-pbc / cpu-pbc200 modes need HAM10000_ROOT
# (--ham10000-root) or PBC_ROOT (--pbc-root) and stop with one line without it. Run the same command again to resume after an interruption.
# More options: bash run_all.sh --help
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

# The quick, cpu and claim modes need no download (random init): never wait for the network.
# The paper mode starts from ImageNet weights, fetched from the Hugging Face hub or its cache.
if [[ "${1:-}" == "quick" || "${1:-}" == cpu* || "${1:-}" == claim* ]]; then
    export HF_HUB_OFFLINE=1
fi

exec "$PY" -m study.run_all "$@"
