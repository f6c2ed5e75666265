#!/usr/bin/env bash
# The GPU measurements, in order of what matters most, each under its own time limit, so that one
# short session on a GPU machine (~8 minutes) gets as far as it can. Needs the project's Python
# environment there (torch with CUDA, ray, detectron2, pycocotools, cleanlab importable as
# $PYTHON). Output: one log per step in $OUT (default runs/gpu-checks/), and a summary on stdout.
#
#   PYTHON=.venv/bin/python bash benchmarks/gpu_checks.sh
#
#   1. held-out inference, kfold-ray's path vs DefaultPredictor (R50-FPN, 640 px): target >= 8x
#   2. GPU busy while one fold of the README's example predicts and trains (nvidia-smi, every
#      200 ms; the fold's own gauge ray_kfold_ray_gpu_utilization reads the same NVML counter):
#      target >= 90%
#   3. two folds packed on one GPU (--gpus-per-fold 0.5) vs one at a time: target >= 1.6x
#   4. Mask R-CNN boxes only vs masks pasted (time, GPU memory per image)
#   5. what of training is alive / reserved on the GPU when a fold starts predicting
#   6. checkpoint uploads (5 s each) in the background vs in the step loop
#   7. if time is left: run_cv overhead (<= 3%) and training img/s vs DefaultTrainer with AMP (>= 1.0x)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-runs/gpu-checks}"
mkdir -p "$OUT"
R50=COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $? ; last lines:" >>"$OUT/summary.txt"
  tail -n 8 "$OUT/$name.log" | sed 's/^/   /' | tee -a "$OUT/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/summary.txt"

step inference 120 "$PYTHON" benchmarks/bench_inference.py --model "$R50" \
    --opts MODEL.WEIGHTS "" --images 400 --size 640 --batch-size 8

# One fold of the example on the GPU (k=3 runs three; the first ~third of the samples is fold 0).
nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 >"$OUT/gpu_util.csv" &
smi=$!
step example_fold 150 "$PYTHON" -m kfold_ray._cli example --run-dir "$OUT/example" --gpus-per-fold 1 \
    --address local
kill "$smi" 2>/dev/null
"$PYTHON" - "$OUT/gpu_util.csv" <<'EOF' | tee -a "$OUT/summary.txt"
import sys
samples = [int(x) for x in open(sys.argv[1]).read().split() if x.strip().isdigit()]
busy = [s for s in samples if s > 0]
if busy:
    print(f"   GPU utilisation while the GPU was in use: mean {sum(busy) / len(busy):.0f}%, "
          f">= 90% in {sum(s >= 90 for s in busy) / len(busy):.0%} of {len(busy)} samples (200 ms)")
else:
    print("   no GPU utilisation sampled")
EOF

step packing 180 "$PYTHON" benchmarks/bench_training.py --model "$R50" --size 640 --iters 100 \
    --packing --opts MODEL.WEIGHTS "" SOLVER.IMS_PER_BATCH 8
step mask_outputs 90 "$PYTHON" benchmarks/bench_mask_outputs.py \
    --model COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml --images 32 --opts MODEL.WEIGHTS ""
step release 90 "$PYTHON" benchmarks/bench_release.py --model "$R50" --size 640 --batch 8 --iters 10 \
    --workers 4 --opts MODEL.WEIGHTS ""
step checkpoint_upload 120 "$PYTHON" benchmarks/bench_checkpoint_upload.py --model "$R50" --size 640 \
    --iters 60 --checkpoint-period 20 --batch 8 --upload-s 5 --repeats 1 --opts MODEL.WEIGHTS ""
step run_cv_and_amp 240 "$PYTHON" benchmarks/bench_training.py --model "$R50" --size 640 --iters 200 \
    --run-cv --repeats 1 --opts MODEL.WEIGHTS "" SOLVER.IMS_PER_BATCH 8 SOLVER.AMP.ENABLED True
