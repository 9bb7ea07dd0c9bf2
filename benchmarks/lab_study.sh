#!/usr/bin/env bash
# The performance lab's full study (the talk, section 3) in one command; docs/lab.md.
#
#   benchmarks/lab_study.sh                 # full study (CPU: ~1-2 h on 2 cores)
#   LAB_STUDY=reduced benchmarks/lab_study.sh   # the reduced study (~15 min on 2 shared cores)
#   DEVICE=cuda DTYPE=float16 benchmarks/lab_study.sh   # on a GPU: real CUDA OOM, no budgets
#
# Every point lands in MLflow under one parent run named $SWEEP; the report (figures,
# speed-up and OOM tables, predictor) is written to $OUT and logged to MLflow.
# Env: LAB_STUDY=full|reduced, THREADS (torch threads; 2), DEVICE (cpu), DTYPE (float32),
# MLFLOW_URI (sqlite:///mlflow.db), EXPERIMENT (lab), SWEEP (study-<time>), OUT (reports/lab).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STUDY=${LAB_STUDY:-full}
THREADS=${THREADS:-2}
DEVICE=${DEVICE:-cpu}
DTYPE=${DTYPE:-float32}
SWEEP=${SWEEP:-study-$STUDY-$(date +%Y%m%d-%H%M%S)}
OUT=${OUT:-reports/lab}
COMMON=(sweep="$SWEEP" threads="$THREADS" model.device="$DEVICE"
        mlflow.tracking_uri="${MLFLOW_URI:-sqlite:///mlflow.db}" mlflow.experiment="${EXPERIMENT:-lab}")
D=model.dtype=$DTYPE
bench() { echo "+ jobs.benchmark $*"; "$PY" -m jobs.benchmark "$@" "${COMMON[@]}" 2>&1 | grep --line-buffered -v ' INFO '; }
t0=$(date +%s)

if [ "$STUDY" = full ]; then
    SIZES=llama_35m,llama_70m,llama_140m,llama_280m,llama_560m,llama_1b
    IN="[32,128,512]"; OUTTOK="[8,32,128]"; REPEATS=3
    SORT_MODEL=llama_70m; SORT_IN=512; BATCHES="[1,2,4,8,16,32,64]"; NPROMPTS=64
    OOM_SIZES=llama_35m,llama_70m,llama_140m,llama_280m; OOM_BUDGETS=1,1.5,2,3
    REPLAY_LIMIT=0
else
    SIZES=llama_35m,llama_70m,llama_140m,llama_280m,llama_560m
    IN="[32,128]"; OUTTOK="[8,32]"; REPEATS=3
    SORT_MODEL=llama_35m; SORT_IN=256; BATCHES="[2,4,8,16]"; NPROMPTS=16
    OOM_SIZES=llama_35m,llama_70m,llama_140m; OOM_BUDGETS=1,1.5
    REPLAY_LIMIT=48
fi
if [ "$DEVICE" != cpu ]; then OOM_BUDGETS=null; fi   # GPU: the real device memory, real CUDA OOM

# 1. Single-batch latency: input x output tokens x model size (+ the real SmolLM2).
SINGLE=(mode=single workload.input_tokens=$IN workload.output_tokens=$OUTTOK workload.repeats=$REPEATS)
bench -m "${SINGLE[@]}" size=$SIZES $D
bench "${SINGLE[@]}" model=smollm2_135m $D
# dtype axis: bf16 (AVX-512 BF16 on this CPU; on GPU compare with float16)
bench "${SINGLE[@]}" size=llama_140m model.dtype=$([ "$DTYPE" = bfloat16 ] && echo float32 || echo bfloat16)
if [ "$STUDY" = full ]; then   # tensor parallelism (2 ranks)
    bench "${SINGLE[@]}" size=llama_140m model.tp_size=2 $D || echo "tp_size=2 failed: see the error above"
fi

# 2. Batches over model sizes (the predictor's batch terms); one batch per point.
bench -m mode=multi size=$SIZES workload.input_tokens=[64] workload.output_tokens=[16] \
    workload.batch_size=[4,16] workload.warm_each_point=false $D

# 3. Throughput vs batch size on mixed lengths: arrival order vs sorted by length, in our packed
#    engine and in an emulated padded one (every row padded to its batch's longest, the talk's setting).
# (repeats=2 without a separate warm run: the fastest repeat is the warm one)
bench mode=multi size=$SORT_MODEL workload.input_tokens=[$SORT_IN] workload.input_spread=0.9 workload.output_tokens=[16] \
    workload.batch_size=$BATCHES workload.n_prompts=$NPROMPTS workload.sorted=[false,true] \
    workload.pad_to_longest=[false,true] workload.repeats=2 workload.warm_each_point=false $D

# 4. OOM boundary: largest batch per model under each memory budget ("device").
if [ "$DEVICE" = cpu ]; then
    bench -m mode=oom size=$OOM_SIZES oom.budget_gb=$OOM_BUDGETS oom.input_tokens=[64] oom.output_tokens=[4] \
        oom.max_batch=256 $D
else
    bench -m mode=oom size=$OOM_SIZES oom.input_tokens=[512] oom.output_tokens=[32] oom.max_batch=4096 $D
fi

# 5. Real-corpus replay with the talk's preset test1: our generator, then the Spark pipeline.
bench mode=replay replay.via=libinfer size=llama_35m generation=test1 replay.limit=$REPLAY_LIMIT \
    replay.batch_size=[8] replay.sorted=[false,true] $D
if [ "$STUDY" = full ]; then REPLAY_MODEL=model=smollm2_135m; else REPLAY_MODEL=size=llama_35m; fi
bench mode=replay replay.via=pipeline $REPLAY_MODEL generation=test1 replay.limit=$REPLAY_LIMIT \
    replay.sorted=[false,true] $D || echo "replay via jobs.pipeline failed: see the error above"

# 6. The report: figures, tables, predictor (largest model held out).
"$PY" -m jobs.report sweep="$SWEEP" out="$OUT" baseline="llama_140m $DEVICE $DTYPE tp1" \
    mlflow.tracking_uri="${MLFLOW_URI:-sqlite:///mlflow.db}" mlflow.experiment="${EXPERIMENT:-lab}" 2>&1 | grep --line-buffered -v ' INFO '
echo "study '$SWEEP' ($STUDY) took $(( $(date +%s) - t0 )) s; report in $OUT"
