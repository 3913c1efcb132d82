#!/usr/bin/env bash
# Every table of the README's "Results", one benchmark after another (each
# optimizer in its own process, so device memory and its peak are its own).
#
#   benchmarks/suite.sh OUT_DIR [PART ...]
#
# GPU PARTs, in the default order (most important first, so a cut-off run still
# has the headline numbers): env step_1b refresh_1b cost_1b convergence_60m
# fno_darcy fno_burgers peer_torch_1b step_1b_more step_1b_fast memory_1b
# step_1b_layerwise refresh_1b_jacobi. Shapes: LLaMA-1B paper
# shape with a 32000-token vocabulary (as the paper's T5 tokenizer), batch
# 32 x 256, bf16 compute, f32 params, no rematerialisation, rank 512, gap 200:
# the setting of the measured peers in DESIGN.md.
#
# CPU PARTs (the small sizes of benchmarks/README.md, about an hour in all on
# 2 cores): `cpu` runs cpu_env cpu_state_1b cpu_cost_1b cpu_refresh cpu_step
# cpu_peer_torch cpu_convergence cpu_convergence_low_bit cpu_fno cpu_fno_paper
# cpu_memory_1b cpu_memory_7b.
#
# Each PART writes OUT_DIR/PART.md (the table printed on stdout), OUT_DIR/PART.log
# (stderr) and its JSON / PNG files; OUT_DIR/suite.log has each part's exit code
# and wall time. Unknown PART names are refused before anything runs.
#
# GPU needs: a CUDA jaxlib (cuDNN for step_1b_fast's attention), one 80 GB-class
# GPU (the 1B f32-param AdamW step peaked at 54.5 GiB on an H100), and for
# peer_torch_1b torch + galore-torch + transformers. With little device time, name
# the parts: the speed work's numbers come from
#   benchmarks/suite.sh OUT cost_1b step_1b step_1b_fast refresh_1b_jacobi
# (cost_1b compiles and times solvers only; each step_1b* part compiles and times
# a few optimizer variants, one process each).
set -u
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/suite.sh OUT_DIR [PART ...]}
shift
parts=("$@")
if [ ${#parts[@]} -eq 0 ]; then
  parts=(env step_1b refresh_1b cost_1b convergence_60m fno_darcy fno_burgers peer_torch_1b step_1b_more step_1b_fast memory_1b step_1b_layerwise refresh_1b_jacobi)
elif [ "${parts[*]}" = cpu ]; then
  parts=(cpu_env cpu_state_1b cpu_cost_1b cpu_refresh cpu_step cpu_peer_torch cpu_convergence cpu_convergence_low_bit cpu_fno cpu_fno_paper cpu_memory_1b cpu_memory_7b)
fi
# Every PART named must exist before the first runs (a typo would otherwise surface
# only after the parts before it spent their device time).
known=$(sed -n 's/^    \([a-z0-9_]*\)).*/\1/p' "$self")
for part in "${parts[@]}"; do
  if ! grep -qx "$part" <<<"$known"; then
    echo "unknown part: $part (known: $(echo $known))" >&2
    exit 2
  fi
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Processes of the same model (adamw in two groups) share compiled programs.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/galore_jax_compile_cache}
py=${PYTHON:-python3}
versions="$py -c 'import jax, flax, optax, orbax.checkpoint; \
print(jax.__version__, flax.__version__, optax.__version__, jax.devices())'"
step_1b=(--config configs/llama_1b.yaml --batch-size 32 --seq-len 256 --gap 200 --windows 1
         --set model.remat=false --set model.vocab_size=32000)
cost_1b=(--config configs/llama_1b.yaml --gap 200 --set model.vocab_size=32000 --time-solvers)
cost_1b_optimizers=(adamw galore galore_stagger galore_reverse_std tensor_galore)
# The compiled step's memory: 1B batch 8 x 256 with remat (the layer-wise issue's shape).
memory_1b=(--config configs/llama_1b.yaml --batch-size 8 --seq-len 256 --set model.remat=true
           --set model.vocab_size=32000)

# Tensor-GaLore at the scale / lr that matched AdamW at CPU sizes (README, FNO section).
fno_tuned=(--set-for tensor_galore optimizer.scale=1.0 --set-for tensor_galore optimizer.lr=6e-3)

run() {  # run PART COMMAND...: stdout -> PART.md, stderr -> PART.log, a line of timing
  local part=$1; shift
  local start=$SECONDS
  echo "== $part: $*" | tee -a "$out/suite.log"
  "$@" >"$out/$part.md" 2>"$out/$part.log"
  echo "== $part: exit $? after $((SECONDS - start)) s" | tee -a "$out/suite.log"
}

for part in "${parts[@]}"; do
  case $part in
    env)
      run env bash -c "nvidia-smi; $versions" ;;
    step_1b)
      run step_1b "$py" benchmarks/train_step.py "${step_1b[@]}" \
        --optimizers adamw galore galore_stagger --out "$out/step_1b.json" ;;
    refresh_1b)
      run refresh_1b "$py" benchmarks/refresh.py --shape 1b --reps 5 --exact-reps 1 \
        --exact-refresh-only --out "$out/refresh_1b.json" ;;
    refresh_1b_jacobi)  # the same randomized refreshes with cuSOLVER's Jacobi eigh (syevj)
      run refresh_1b_jacobi "$py" benchmarks/refresh.py --shape 1b --reps 5 \
        --methods randomized randomized_warm --eigh-implementation jacobi \
        --out "$out/refresh_1b_jacobi.json" ;;
    cost_1b)  # GPU fusion and GPU solver times; measured times from step_1b when it ran
      measured=()
      [ -f "$out/step_1b.json" ] && measured=(--measured "$out/step_1b.json")
      run cost_1b "$py" benchmarks/update_cost.py "${cost_1b[@]}" "${measured[@]}" \
        --optimizers "${cost_1b_optimizers[@]}" galore_exact --out "$out/cost_1b.json" ;;
    convergence_60m)
      run convergence_60m "$py" benchmarks/convergence.py --config configs/llama_60m.yaml \
        --steps 3000 --eval-every 250 --optimizers adamw galore --set batch_size=128 \
        --out-dir "$out/convergence_60m" ;;
    fno_darcy)  # 4x the CPU config's grid points, 4x the data, 4x the kept modes
      run fno_darcy "$py" benchmarks/fno_optimizers.py --datasets darcy --steps 1000 \
        --set data.resolution=64 --set data.n_train=1000 --set data.n_test=200 \
        --set "model.modes=[16,16]" --set model.width=32 --set batch_size=32 \
        --set eval_every=500 "${fno_tuned[@]}" --out "$out/fno_darcy.json" ;;
    fno_burgers)
      run fno_burgers "$py" benchmarks/fno_optimizers.py --datasets burgers --steps 1000 \
        --set data.resolution=1024 --set data.n_train=1000 --set data.n_test=200 \
        --set model.width=64 --set batch_size=32 --set eval_every=500 "${fno_tuned[@]}" \
        --out "$out/fno_burgers.json" ;;
    step_1b_layerwise)  # layer-wise vs standard GaLore step time (target: at most 1.05x)
      run step_1b_layerwise "$py" benchmarks/train_step.py "${step_1b[@]}" \
        --optimizers galore galore_layerwise --out "$out/step_1b_layerwise.json" ;;
    step_1b_more)
      run step_1b_more "$py" benchmarks/train_step.py "${step_1b[@]}" \
        --optimizers adamw optax_galore tensor_galore --out "$out/step_1b_more.json" ;;
    step_1b_fast)  # the two changes predicted to lift throughput: cuDNN attention, bf16 params
      run step_1b_fast "$py" benchmarks/train_step.py "${step_1b[@]}" \
        --set model.attention_implementation=cudnn --set model.param_dtype=bfloat16 \
        --optimizers adamw galore galore_jacobi galore_master --out "$out/step_1b_fast.json" ;;
    peer_torch_1b)
      run peer_torch_1b "$py" benchmarks/peer_torch.py "${step_1b[@]}" \
        --out "$out/peer_torch_1b.json" ;;
    memory_1b)  # bf16 params, compiled peak and peak_bytes_in_use after 3 real steps
      run memory_1b "$py" benchmarks/memory.py "${memory_1b[@]}" --set model.param_dtype=bfloat16 \
        --run-steps 3 --json "$out/memory_1b.json" ;;
    cpu_memory_1b)  # compile only; f32 params (XLA:CPU upcasts bf16 dots)
      run cpu_memory_1b "$py" benchmarks/memory.py "${memory_1b[@]}" --json "$out/cpu_memory_1b.json" ;;
    cpu_memory_7b)
      run cpu_memory_7b "$py" benchmarks/memory.py "${memory_1b[@]}" --config configs/llama_7b.yaml \
        --set model.param_dtype=float32 --json "$out/cpu_memory_7b.json" ;;
    cpu_env)
      run cpu_env bash -c "lscpu | grep -E 'Model name|^CPU\(s\)'; $versions" ;;
    cpu_state_1b)  # abstract state (nothing allocated): the peers' bf16 params, then f32
      for dtype in bfloat16 float32; do
        run cpu_state_1b_$dtype "$py" benchmarks/train_step.py "${step_1b[@]}" --state-only \
          --set model.param_dtype=$dtype --out "$out/cpu_state_1b_$dtype.json" \
          --optimizers adamw galore galore_reverse_std galore_8bit galore_8bit_int4 \
          tensor_galore optax_galore
      done
      # low-bit projectors make projecting the larger side the smaller state
      run cpu_state_1b_bfloat16_reverse_std "$py" benchmarks/train_step.py "${step_1b[@]}" \
        --state-only --set model.param_dtype=bfloat16 --set optimizer.proj_type=reverse_std \
        --out "$out/cpu_state_1b_bfloat16_reverse_std.json" \
        --optimizers galore galore_8bit galore_8bit_int4 ;;
    cpu_cost_1b)  # compiled for CPU (FLOPs, bytes, solver calls), H100 floors and times;
      # without galore_exact, whose batched SVDs take minutes each on 2 cores
      run cpu_cost_1b "$py" benchmarks/update_cost.py "${cost_1b[@]}" \
        --optimizers "${cost_1b_optimizers[@]}" \
        --measured benchmarks/results/h100/step_1b.json --out "$out/cpu_cost_1b.json" ;;
    cpu_refresh)
      run cpu_refresh "$py" benchmarks/refresh.py --shape small --optax-contrib \
        --out "$out/cpu_refresh.json" ;;
    cpu_step)
      run cpu_step "$py" benchmarks/train_step.py --config configs/llama_tiny.yaml \
        --batch-size 8 --gap 10 --out "$out/cpu_step.json" ;;
    cpu_peer_torch)
      run cpu_peer_torch "$py" benchmarks/peer_torch.py --config configs/llama_tiny.yaml \
        --batch-size 8 --gap 10 --out "$out/cpu_peer_torch.json" ;;
    cpu_convergence)
      run cpu_convergence "$py" benchmarks/convergence.py --config configs/llama_tiny.yaml \
        --steps 300 --out-dir "$out/cpu_convergence" ;;
    cpu_convergence_low_bit)  # 8-bit moments, int8 / int4 projectors vs 32-bit, 2 seeds
      run cpu_convergence_low_bit "$py" benchmarks/convergence.py --config configs/llama_tiny.yaml \
        --steps 300 --optimizers galore galore_8bit galore_8bit_int4 --seeds 0 1 \
        --out-dir "$out/cpu_convergence_low_bit" ;;
    cpu_convergence_60m)  # not in `cpu`: the paper's 60M shape, 150 short steps (~27 min)
      run cpu_convergence_60m "$py" benchmarks/convergence.py --config configs/llama_60m.yaml \
        --steps 150 --eval-every 50 --set batch_size=8 --set log_every=10 \
        --optimizers adamw galore --out-dir "$out/cpu_convergence_60m" ;;
    cpu_frontier)  # not in `cpu` (~2 h): every optimizer at its best of 3 LRs, 1000 steps, 2 seeds
      run cpu_frontier "$py" benchmarks/convergence.py --config configs/llama_tiny.yaml \
        --steps 1000 --eval-every 100 --sweep --no-extend --seeds 0 1 --jobs 2 \
        --optimizers adamw galore fira apollo apollo_mini adamw_8bit adafactor muon \
        --out-dir "$out/cpu_frontier" ;;
    cpu_collectives_60m)  # bytes through collectives per step, 8 CPU devices, data-parallel
      run cpu_collectives_60m "$py" benchmarks/memory.py --config configs/llama_60m.yaml \
        --devices 8 --set mesh.data=8 --rank 128 --variants adamw galore --collectives \
        --json "$out/cpu_collectives_60m.json" ;;
    cpu_fno)  # the configs' CPU sizes
      run cpu_fno "$py" benchmarks/fno_optimizers.py --steps 1000 "${fno_tuned[@]}" \
        --out "$out/cpu_fno.json" ;;
    cpu_fno_paper)  # Tensor-GaLore at the paper's scale 0.25 and the config's lr
      run cpu_fno_paper "$py" benchmarks/fno_optimizers.py --steps 1000 \
        --optimizers tensor_galore --out "$out/cpu_fno_paper.json" ;;
  esac
done
