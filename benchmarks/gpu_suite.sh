#!/usr/bin/env bash
# One GPU session's checks and benchmarks, by section, in the order given:
#   bash benchmarks/gpu_suite.sh setup correct w3 w1 ...
# Sections:
#   setup      install the project (and, if .whl/ exists, the server's wheels into /tmp/site;
#              if .twhl/ exists, its wheels into /tmp/tsite, for START_SITE below)
#   correct    tiny models' greedy tokens == transformers, also with asynchronous scheduling;
#              logits processing and prompt log-probs as served (sampling_extras_check.py)
#   kcheck     the Triton kernels against their references at real sizes
#   kernels    kernel benchmarks
#   tiles      paged attention tile shapes against the tile rules, bf16 and fp8 caches
#              (benchmarks/attention_sweep.py)
#   mixedattn  attention of mixed steps, decodes in the chunks' launch or apart
#              (benchmarks/mixed_attention.py)
#   w3         W3 decode grid, synchronous and asynchronous scheduling, one engine each
#   w3d        W3 decode grid with the engine's default scheduling, and the step profile
#   w1         W1 against transformers in the same run (engine defaults)
#   w1sync     W1 on Metroline only, asynchronous scheduling off
#   w2 / w4    W2 / W4 on Metroline (engine defaults)
#   w5         W5 online serving (needs the server's wheels; RATES, W5_REQUESTS, W5_SECONDS)
#   tp         2 GPUs: TP smoke test, TP=2 vs TP=1, KV capacity (CAPACITY shapes)
#   tpscale    TP_SIZES (default 1,2,4): logits and greedy agreement against the smallest TP
#              for SCALE_SHAPES, and a replicated-KV-head model at the largest TP
#              (FP32_REFERENCE=1: also each shape in fp32 at its largest TP, the noise floor)
#   w3tp       W3 at batch 1, context 512, at each of TP_SIZES
#   w1runs     W1 on Metroline for each MODEL:TP[:FLAG] in W1_RUNS (default qwen2.5-32b:2),
#              FLAG one throughput.py option, e.g. llama3-8b:1:--mixed-step-graphs
#   steps      where a step's time goes: kernel families of prefill and decode steps
#              (benchmarks/step_profile.py at STEP_FLAGS, default the engine's defaults)
#   vparts     copy the carried vLLM bundle parts (.vparts/vllm-part*) to /tmp/vparts; a
#              command that carries a part runs this, the one that carries the last adds peer
#   structured the structured-output tests on CUDA (with the other logits-processing and
#              async/graph tests; needs .whl: xgrammar, pytest, jsonschema), then W7
#              (benchmarks/structured.py) with the bounded and the long schemas
#   peer       vLLM 0.26.0 side by side, offline (unpacks the bundle once all parts came):
#              W1 PEER_RUNS times (default 2) on each engine at its defaults (PEER_EQUAL=1:
#              vLLM once more at Metroline's max_num_seqs / max_num_batched_tokens, which
#              today equal vLLM's own H200 defaults), W3 at batch 1 and 256 (context 512),
#              then the peer table (benchmarks/peer_table.py)
#   fp8        fp8 weights and KV (issue 18): tests/gpu/fp8_check.py (kernels at real sizes,
#              8B-shape logits and greedy agreement vs bf16, KV capacity, the demo model's
#              perplexity), then W3 at batches FP8_BATCHES (default 1,8,256), context 512, bf16
#              and fp8 weights + fp8 KV, one engine each
#   fp8w1      W1 on Metroline FP8_RUNS times (default 1) in bf16 and in fp8 weights + KV
#   fp8peer    vLLM 0.26.0 W1 with quantization=fp8 and kv_cache_dtype=fp8, FP8_RUNS times
#              (unpacks the bundle once all parts came), then the peer table; needs vLLM's
#              compressed-tensors==0.17.0 and loguru wheels in .whl (setup installs them)
#   spec       W8 speculative decoding (issue 20): TPOT at SPEC_BATCHES (default 1,8), K=4,
#              plain vs drafts at forced acceptance 1.0/0.7/0.5, a llama3-1b-shape draft
#              model (measured and forced acceptance) and n-gram on repetitive prompts
#              (benchmarks/spec_decode.py)
#   start      metroline serve's start to /ready, START_RUNS times (default 3; the first fills
#              the Triton cache), with the log's milestones (benchmarks/serve_start.py;
#              needs the server's wheels); START_SITE=/tmp/tsite puts .twhl/'s wheels (say, a
#              newer transformers and its dependencies) before them
#   peerserve  W6: vllm bench serve against metroline serve and vllm serve in turn
#              (RATES_W6, default 10,20,30,inf; W6_PROMPTS, default 300), start-up times,
#              then the peer table
# Results go to $RESULTS (default $OUT/results, or ./results), then into one tarball in
# $OUT when $OUT is set. MODEL (default llama3-8b) picks the shape for w1-w5. BUDGET_S, if
# set, bounds the whole script: a section still running then is stopped (and marked so), and
# the results so far are still packed.
set -uo pipefail
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
MODEL=${MODEL:-llama3-8b}
RESULTS=${RESULTS:-${OUT:-.}/results}
mkdir -p "$RESULTS"
status=0
VLLM_ENV=(env PYTHONPATH=/tmp/vsite:/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1)

gpu_idle() {  # vLLM's engine-core child can outlive its parent: no GPU process may linger
  local pids
  pids=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ')
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null
  sleep 2
  return 0
}

engine_default() {  # the engine's default of one EngineArgs field
  $PY -P -c "import dataclasses, sys; from metroline.engine.config import EngineArgs
print({f.name: f.default for f in dataclasses.fields(EngineArgs)}[sys.argv[1]])" "$1"
}

unpack_vllm() {
  [ -d /tmp/vsite/vllm ] && return 0
  local parts
  parts=$(ls /tmp/vparts/vllm-part* 2>/dev/null | wc -l)
  echo "=== vLLM bundle: $parts parts in /tmp/vparts"
  bash "${VPARTS:-.vparts}/unpack.sh" || { echo "vLLM bundle incomplete" >&2; return 1; }
}

run() {  # run NAME COMMAND...: time a section, keep going after a failure
  local name=$1
  shift
  local started=$SECONDS
  local limit=()
  if [ -n "${BUDGET_S:-}" ]; then
    local left=$((BUDGET_S - SECONDS))
    if [ "$left" -le 5 ]; then
      echo "=== $name: not run, budget spent" | tee -a "$RESULTS/summary.txt"
      status=1
      return
    fi
    limit=(timeout --signal=INT --kill-after=10 "$left")
  fi
  echo "=== $name: $*"
  "${limit[@]}" "$@" 2>&1 | tee -a "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - started)) s" | tee -a "$RESULTS/summary.txt"
  [ "$rc" = 0 ] || status=1
}

for section in "$@"; do
  case $section in
    setup)
      if [ -d .whl ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
          .whl/*.whl || exit 1
      fi
      if [ -d .twhl ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/tsite \
          .twhl/*.whl || exit 1
      fi
      $PY -P -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/gpus.csv"
      ;;
    correct)
      run correct env OUT="$RESULTS" $PY -P tests/gpu/engine_vs_transformers.py tiny
      run sampling-extras env OUT="$RESULTS" $PY -P tests/gpu/sampling_extras_check.py
      ;;
    structured)
      run structured-tests env PYTHONPATH=/tmp/site $PY -P -m pytest -q -p no:cacheprovider \
        tests/engine/test_structured_outputs.py tests/engine/test_grammar_core.py \
        tests/engine/test_sampling_extras.py tests/engine/test_token_constraints.py \
        tests/engine/test_prompt_logprobs.py tests/engine/test_async_scheduling.py \
        tests/engine/test_step_graphs.py -k "not tensor_parallel and not cpu_engine"
      for schemas in bounded long; do
        run "structured-$schemas" env PYTHONPATH=/tmp/site $PY -P benchmarks/structured.py \
          --model "$MODEL" --schemas "$schemas" --out "$RESULTS"
      done
      ;;
    kcheck) run kcheck $PY -P tests/gpu/check_kernels.py --out "$RESULTS" ;;
    kernels) run kernels $PY -P benchmarks/kernel_bench.py --out "$RESULTS" ;;
    mixedattn) run mixedattn $PY -P benchmarks/mixed_attention.py --out "$RESULTS" ;;
    w3)
      run w3-sync $PY -P benchmarks/decode.py --model "$MODEL" --no-async-scheduling \
        --out "$RESULTS"
      run w3-async $PY -P benchmarks/decode.py --model "$MODEL" --async-scheduling --profile \
        --out "$RESULTS"
      ;;
    w3d)
      run w3-default $PY -P benchmarks/decode.py --model "$MODEL" --profile --out "$RESULTS"
      ;;
    w1)
      run w1-both $PY -P benchmarks/throughput.py --model "$MODEL" --workload W1 --backend both \
        --hf-max-requests 128 --out "$RESULTS"
      ;;
    w1sync)
      run w1-sync $PY -P benchmarks/throughput.py --model "$MODEL" --workload W1 \
        --no-async-scheduling --out "$RESULTS"
      ;;
    w2) run w2 $PY -P benchmarks/throughput.py --model "$MODEL" --workload W2 --out "$RESULTS" ;;
    w4) run w4 $PY -P benchmarks/throughput.py --model "$MODEL" --workload W4 --out "$RESULTS" ;;
    w5)
      run w5 env PYTHONPATH=/tmp/site $PY -P benchmarks/serve.py --model "$MODEL" \
        --rates "${RATES:-4,8,12,16,20,24}" --num-requests "${W5_REQUESTS:-150}" \
        --min-seconds "${W5_SECONDS:-0}" \
        --server-args "${SERVER_ARGS:-}" --out "$RESULTS"
      ;;
    tp)
      run tp-smoke $PY -P tests/gpu/tp_smoke.py
      run tp-check env OUT="$RESULTS" $PY -P tests/gpu/tensor_parallel_check.py \
        --capacity ${CAPACITY:-llama3-8b qwen2.5-32b}
      ;;
    tpscale)
      run tp-scale env OUT="$RESULTS" $PY -P tests/gpu/tp_scaling_check.py \
        --tp-sizes "${TP_SIZES:-1,2,4}" --shapes ${SCALE_SHAPES:-llama3-8b llama3-70b:8} \
        ${FP32_REFERENCE:+--fp32-reference}
      ;;
    w3tp)
      for tp in ${TP_SIZES//,/ }; do
        run "w3-b1-tp$tp" $PY -P benchmarks/decode.py --model "$MODEL" --tensor-parallel-size "$tp" --batches 1 \
          --contexts 512 --out "$RESULTS"
      done
      ;;
    w1runs)
      for spec in ${W1_RUNS:-qwen2.5-32b:2}; do
        IFS=: read -r model tp flag <<< "$spec"
        run "w1-$model-tp$tp${flag:+-${flag#--}}" $PY -P benchmarks/throughput.py \
          --model "$model" --workload W1 --tensor-parallel-size "$tp" ${flag:+"$flag"} --out "$RESULTS"
      done
      ;;
    steps)
      run steps $PY -P benchmarks/step_profile.py --model "$MODEL" ${STEP_FLAGS:-} --out "$RESULTS"
      ;;
    vparts)
      mkdir -p /tmp/vparts && cp "${VPARTS:-.vparts}"/vllm-part* /tmp/vparts/ && ls /tmp/vparts
      ;;
    peer)
      unpack_vllm || { status=1; continue; }
      W1=(benchmarks/throughput.py --model "$MODEL" --workload W1 --out "$RESULTS")
      for i in $(seq "${PEER_RUNS:-2}"); do
        run "w1-metroline-$i" $PY -P "${W1[@]}" --backend metroline
        gpu_idle
        run "w1-vllm-$i" "${VLLM_ENV[@]}" $PY -P "${W1[@]}" --backend vllm
        gpu_idle
      done
      if [ -n "${PEER_EQUAL:-}" ]; then
        run w1-vllm-equal "${VLLM_ENV[@]}" $PY -P "${W1[@]}" --backend vllm \
          --vllm-arg "max_num_seqs=$(engine_default max_num_seqs)" \
          --vllm-arg "max_num_batched_tokens=$(engine_default max_num_batched_tokens)"
        gpu_idle
      fi
      run w3-peer $PY -P benchmarks/decode.py --model "$MODEL" --batches 1,256 --contexts 512 \
        --out "$RESULTS"
      run peer-table $PY -P benchmarks/peer_table.py "$RESULTS"
      ;;
    fp8)
      run fp8-check env OUT="$RESULTS" $PY -P tests/gpu/fp8_check.py
      W3=(benchmarks/decode.py --model "$MODEL" --batches "${FP8_BATCHES:-1,8,256}" --contexts 512
        --out "$RESULTS")
      run w3-bf16 $PY -P "${W3[@]}"
      run w3-fp8 $PY -P "${W3[@]}" --quantization fp8 --kv-cache-dtype fp8
      ;;
    spec)
      if [ -d /tmp/site/_pytest ]; then  # the CPU suite's speculative tests, on CUDA
        run spec-tests env PYTHONPATH=/tmp/site $PY -P -m pytest -q -p no:cacheprovider \
          tests/engine/test_spec_decode.py tests/engine/test_spec_draft_model.py \
          -k "not tensor_parallel"
      fi
      run w8 $PY -P benchmarks/spec_decode.py --model "$MODEL" --batches "${SPEC_BATCHES:-1,8}" \
        --out "$RESULTS"
      ;;
    fp8w1)
      W1=(benchmarks/throughput.py --model "$MODEL" --workload W1 --out "$RESULTS")
      for i in $(seq "${FP8_RUNS:-1}"); do
        run "w1-bf16-$i" $PY -P "${W1[@]}" --backend metroline
        run "w1-fp8-$i" $PY -P "${W1[@]}" --backend metroline --quantization fp8 \
          --kv-cache-dtype fp8
      done
      ;;
    fp8peer)
      unpack_vllm || { status=1; continue; }
      if ! "${VLLM_ENV[@]}" $PY -c "import compressed_tensors" 2>/dev/null; then
        # vLLM's quantization registry imports it; the peer bundle does not carry it.
        echo "fp8peer: compressed_tensors missing: run, before the first command," \
          "pip download --no-deps compressed-tensors==0.17.0 loguru -d .whl" >&2
        status=1
        continue
      fi
      W1=(benchmarks/throughput.py --model "$MODEL" --workload W1 --out "$RESULTS")
      for i in $(seq "${FP8_RUNS:-1}"); do
        run "w1-vllm-fp8-$i" "${VLLM_ENV[@]}" $PY -P "${W1[@]}" --backend vllm \
          --quantization fp8 --kv-cache-dtype fp8
        gpu_idle
      done
      run peer-table $PY -P benchmarks/peer_table.py "$RESULTS"
      ;;
    tiles) run tiles $PY -P benchmarks/attention_sweep.py --out "$RESULTS" ;;
    start)
      run start env PYTHONPATH="${START_SITE:+$START_SITE:}/tmp/site" \
        $PY -P benchmarks/serve_start.py --model "$MODEL" \
        --runs "${START_RUNS:-3}" --out "$RESULTS"
      ;;
    peerserve)
      unpack_vllm || { status=1; continue; }
      run w6 "${VLLM_ENV[@]}" $PY -P benchmarks/peer_serve.py --model "$MODEL" \
        --rates "${RATES_W6:-10,20,30,inf}" --num-prompts "${W6_PROMPTS:-300}" --out "$RESULTS"
      gpu_idle
      run peer-table $PY -P benchmarks/peer_table.py "$RESULTS"
      ;;
    *) echo "unknown section $section" >&2; status=1 ;;
  esac
done

echo "=== summary"
cat "$RESULTS/summary.txt" 2>/dev/null
if [ -n "${OUT:-}" ] && [ "$RESULTS" = "$OUT/results" ]; then
  # One file back (the device tool returns at most 8): every JSON, table and log, no traces.
  tar czf "$OUT/results.tgz" -C "$OUT" --exclude '*trace*' results && rm -rf "$OUT/results"
fi
exit $status
