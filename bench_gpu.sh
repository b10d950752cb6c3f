#!/usr/bin/env bash
# The GPU check of the performance work in one go: under 5 minutes on one H100 (a 285 s budget: the
# groups' time limits below add up to 275 s, the rest is for the environment and summary lines), JSON
# lines on stdout.
#
#   bash bench_gpu.sh             # CUDA: the paper's models, random init, no download needed
#   bash bench_gpu.sh --dry-run   # CPU, tiny models, 1 step: checks that every part runs and parses
#
# What it measures (benchmarks/bench.py, one JSON line per measurement, then a summary line):
#   1. the loader side per worker at 384 px: JPEG files vs the decoded cache (CPU transforms) vs the
#      uint8 cache read of --gpu-aug, and the cache build;
#   2. ResNet-50 + ViT-B/16 at 384 px, batch 16: the CASS step on a resident batch, CASS end to end
#      (loader from the decoded cache with 8 workers, pinned memory, augmentation on the GPU), the
#      DINO step of each arm with its multi-crop (2 x 384 + 8 x 96 px) and end to end, the ratios
#      DINO / CASS per step, the augmentation kernels, the fine-tuning steps;
#   3. the CASS step at batch 64 (peak memory);
#   4. the CASS step with --compile (last: compilation takes a minute or two).
# Peak memory: both torch.cuda.max_memory_allocated (peak_mem_mb) and max_memory_reserved
# (peak_reserved_mb: what the process holds, what runs out), over the timed steps after the warm-up.
# Targets checked in the summary line: CASS end to end >= 800 img/s at batch 16, CASS batch 64 peak
# reserved memory < 40 GB. Every group runs under its own timeout: one that fails or hangs prints an error
# line and the others still run. Set PYTHON to choose the interpreter (default .venv/bin/python, else
# python3) and OUT to also keep the lines in $OUT/bench_gpu.jsonl.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: bash bench_gpu.sh [--dry-run]" >&2; exit 2 ;;
esac

if [[ $DRY == 1 ]]; then
    COMMON=(--device cpu --cnn resnet18 --vit vit_tiny_patch16_224 --img-size 32 --local-size 16 --local-crops 2
            --out-dim 256 --steps 1 --warmup 1 --n-images 16 --data-size 64 --gpu-aug)
    WORKERS=2; BIG_BS=4; SCALE=2  # a slow shared CPU: twice the time limits
else
    COMMON=(--device cuda --cnn resnet50 --vit vit_base_patch16_384 --img-size 384 --local-size 96 --local-crops 8
            --out-dim 65536 --steps 30 --warmup 8 --n-images 256 --data-size 384)
    WORKERS=8; BIG_BS=64; SCALE=1
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/cass-bench-gpu.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
LINES="$TMP/lines.jsonl"
: > "$LINES"

BUDGET=$(( 285 * SCALE ))  # the whole script stays under 5 minutes (twice that in the dry run)
LIMITS=(35 105 30 105)  # data, steps_bs16, steps_bs64, compile_bs16: 275 s, the rest for the first and last lines
if (( (LIMITS[0] + LIMITS[1] + LIMITS[2] + LIMITS[3]) * SCALE > BUDGET )); then
    echo "bench_gpu.sh: the groups' time limits add up to more than the budget of ${BUDGET}s" >&2
    exit 2
fi
DEADLINE=$(( SECONDS + BUDGET ))

# run SECONDS NAME benchmarks/bench.py-args...: one group under min(SECONDS, time left), its JSON lines to
# stdout and $LINES; a group with under 20 s left is skipped with a line saying so
run() {
    local limit=$(( $1 * SCALE )) group=$2 left=$(( DEADLINE - SECONDS ))
    shift 2
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then
        printf '{"name": "%s", "skipped": "out of time (%ss left of %ss)", "img_per_s": null, "peak_mem_mb": null}\n' \
            "$group" "$left" "$BUDGET" | tee -a "$LINES"
        return
    fi
    echo "bench_gpu: $group (limit ${limit}s)" >&2
    timeout --kill-after=10 "$limit" "$PY" -m benchmarks.bench "${COMMON[@]}" --tmp "$TMP/data" "$@" | tee -a "$LINES"
    local rc=${PIPESTATUS[0]}
    if [[ $rc != 0 ]]; then
        printf '{"name": "%s", "error": "benchmarks/bench.py exited %s%s", "img_per_s": null, "peak_mem_mb": null}\n' \
            "$group" "$rc" "$([[ $rc == 124 || $rc == 137 ]] && echo ' (timed out)')" | tee -a "$LINES"
    fi
}

"$PY" - <<'EOF' | tee -a "$LINES"
import json, os, torch
try:
    import timm, timm.layers
    fused = timm.layers.use_fused_attn()
    tv = timm.__version__
except Exception as e:  # noqa: BLE001
    fused, tv = None, f"error: {e}"
cuda = torch.cuda.is_available()
print(json.dumps({"name": "environment", "torch": torch.__version__, "cuda": torch.version.cuda, "timm": tv,
                  "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                  "gpu_mem_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
                  "cpus": os.cpu_count(), "timm_fused_attn": fused, "img_per_s": None, "peak_mem_mb": None}))
EOF

run "${LIMITS[0]}" data --workers 1 --only cache_build,data_jpeg,data_cache,data_uint8
run "${LIMITS[1]}" steps_bs16 --bs 16 --workers "$WORKERS" \
    --only cass_step,cass_e2e,dino_step_cnn,dino_step_vit,cass_vs_dino,dino_e2e_cnn,dino_e2e_vit,gpu_aug_cass,gpu_aug_dino,finetune_step_cnn,finetune_step_vit
run "${LIMITS[2]}" steps_bs64 --bs "$BIG_BS" --only cass_step
if [[ $DRY == 1 ]]; then
    echo '{"name": "compile_bs16", "skipped": "dry run (compiling on a CPU takes minutes)", "img_per_s": null, "peak_mem_mb": null}' | tee -a "$LINES"
else
    run "${LIMITS[3]}" compile_bs16 --bs 16 --compile --only cass_step
fi

"$PY" - "$LINES" <<'EOF'
import json, sys
recs = {}
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except json.JSONDecodeError:
        continue
    key = r["name"] + (f"_bs{r['bs']}" if "bs" in r else "") + ("_compile" if r.get("compile") else "")
    recs[key] = r
e2e = recs.get("cass_e2e_bs16", {})
big = next((r for k, r in recs.items() if k.startswith("cass_step_bs") and k != "cass_step_bs16" and not r.get("compile")), {})
errors = sorted(k for k, r in recs.items() if "error" in r)
out = {"name": "summary",
       "cass_e2e_bs16_img_per_s": e2e.get("img_per_s"),
       "target_e2e_800_img_per_s": (e2e.get("img_per_s") or 0) >= 800,
       "cass_step_bs16_img_per_s": recs.get("cass_step_bs16", {}).get("img_per_s"),
       "cass_step_bs16_compiled_img_per_s": recs.get("cass_step_bs16_compile", {}).get("img_per_s"),
       "cass_step_big_bs": big.get("bs"), "cass_step_big_bs_peak_mem_mb": big.get("peak_mem_mb"),
       "cass_step_big_bs_peak_reserved_mb": big.get("peak_reserved_mb"),
       "target_bs64_under_40GB": big.get("peak_reserved_mb") is not None and big["peak_reserved_mb"] < 40 * 1024,
       "dino_both_over_cass": recs.get("cass_vs_dino_bs16", {}).get("dino_both_over_cass"),
       "errors": errors}
print(json.dumps(out))
EOF

if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
    cp "$LINES" "$OUT/bench_gpu.jsonl"
fi
