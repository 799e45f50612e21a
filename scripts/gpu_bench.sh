#!/usr/bin/env bash
# Issue 4's GPU check, in one go: (0) the same EP steps in float64 on CPU and GPU, with and without CUDA graphs
# (scripts/gpu_agree.py), and the suite's GPU tests; (1) `earlyprop bench` configs A,B,C,D and the GPU config G
# (784-1024-1024-10, batch 256, 20 + 4 Euler steps, one-sided EP) on CUDA; (2) a host-sync check of the relaxation on
# the device, with and without CUDA graphs; (2b) the graphs' cost in the first batches (scripts/gpu_graph_cost.py);
# (3) G with TF32; (3b) the conv configs M, N; (4) configs A-D on this machine's CPU (1 thread) for comparison; (5) the
# README's main job (digits) on CUDA, with and without CUDA graphs.
#
# Run from anywhere (it cd's to the repository root); needs python3 >= 3.10 with torch (CUDA build) and pytest,
# nothing else (no pip install; numpy, scikit-learn are needed by step 5 only):
#   OUT=/some/folder bash scripts/gpu_bench.sh
# Outputs in $OUT (default ${TMPDIR:-/tmp}/gpu_bench_out): agree.*, tests_cuda.txt, bench_cuda.json, bench_cuda.txt
# (the table), sync_check.*, graph_cost.*, bench_cuda_G_tf32.*, bench_cuda_M.*, bench_cpu_here.*, train_cuda*.txt,
# nvidia-smi.txt, env.txt, summary.txt (rc and seconds of every step; a step's stderr, if any, beside its output as
# *.stderr). Each step has a time limit, and a step that would start past DEADLINE seconds (default 420) is skipped.
# Without a GPU it falls back to the CPU with 2 timed batches per config (a dry run of the script itself:
# bench_cpu.json/.txt). Overrides: DEVICE=cpu|cuda, REPEATS=N (all configs), PYTHON=python3, DEADLINE=seconds,
# ONLY=agree,tests,bench,sync,graphs,tf32,conv,cpu,train (the steps to run, by the first word of their names).
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-${TMPDIR:-/tmp}/gpu_bench_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

DEADLINE="${DEADLINE:-420}"
ONLY="${ONLY:-agree,tests,bench,sync,graphs,tf32,conv,cpu,train}"
step() {  # step NAME TIMEOUT_S STDOUT_FILE COMMAND...: run with a time limit, log rc and seconds
    local name=$1 limit=$2 dest=$3 start=$SECONDS rc
    shift 3
    case ",$ONLY," in *",${name%% *},"*) ;; *) echo "$name skipped: not in ONLY=$ONLY" >> "$SUMMARY"; return 0;; esac
    if [ $((SECONDS + 10)) -ge "$DEADLINE" ]; then
        echo "$name skipped: past the deadline (${SECONDS}s of ${DEADLINE}s)" | tee -a "$SUMMARY" >&2
        return 124
    fi
    [ $((SECONDS + limit)) -le "$DEADLINE" ] || limit=$((DEADLINE - SECONDS))
    echo "== $name: $*" >&2
    timeout --kill-after=10 "$limit" "$@" > "$dest" 2> "$dest.stderr"
    rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$SUMMARY" >&2
    [ -s "$dest.stderr" ] || rm -f "$dest.stderr"
    return $rc
}

{
    date -u; uname -a; "$PY" --version
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available",
torch.cuda.is_available(), "devices", torch.cuda.device_count())'
    lscpu 2>/dev/null | head -20
    uptime
} > "$OUT/env.txt" 2>&1
if command -v nvidia-smi > /dev/null; then
    { nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
        --format=csv; } > "$OUT/nvidia-smi.txt" 2>&1
else
    echo "nvidia-smi not found" > "$OUT/nvidia-smi.txt"
fi

DEVICE="${DEVICE:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null)}"
DEVICE="${DEVICE:-cpu}"
if [ "$DEVICE" = cpu ]; then
    echo "no CUDA device: CPU dry run with ${REPEATS:-2} timed batches per config" | tee -a "$SUMMARY" >&2
    REPEATS="${REPEATS:-2}"
fi
REP=(${REPEATS:+--repeats "$REPEATS"})  # expanded as ${REP[@]+"${REP[@]}"}: empty arrays under set -u
BENCH=("$PY" -m earlyprop bench --device "$DEVICE")

# 0. the same EP steps on the CPU and the device, float64 (exits 1 if a relative difference is above 1e-9)
if [ "$DEVICE" = cuda ]; then
    step "agree cpu/cuda float64" 120 "$OUT/agree.txt" "$PY" scripts/gpu_agree.py cuda "$OUT/agree.json"
    # the suite's GPU tests (CUDA graphs against the plain step); the rest of the suite is the CPU's
    step "tests cuda" 90 "$OUT/tests_cuda.txt" "$PY" -m pytest -q -p no:cacheprovider tests/speed/test_cuda_graphs.py
fi

# 1. the main run: A,B,C,D,G interleaved in one process (ratios from one run); the table on stdout
step "bench $DEVICE A,B,C,D,G" 150 "$OUT/bench_$DEVICE.txt" "${BENCH[@]}" --configs A,B,C,D,G ${REP[@]+"${REP[@]}"} \
    --json-out "$OUT/bench_$DEVICE.json"
main=$?
if [ $main -ne 0 ] && [ $main -ne 124 ] && [ $main -ne 137 ]; then
    # it failed fast: one process per config, so whatever works still comes back
    for cfg in G A B C D; do
        step "bench $DEVICE $cfg alone" 30 "$OUT/bench_${DEVICE}_$cfg.txt" "${BENCH[@]}" --configs "$cfg" \
            ${REP[@]+"${REP[@]}"} --json-out "$OUT/bench_${DEVICE}_$cfg.json"
    done
fi
[ "$DEVICE" = cuda ] || exit 0

# 2. host syncs on the device: CUDA's sync debug mode warns at every synchronising call; their count must
#    grow with the number of checks (check_every), not with the number of steps
step "sync check" 60 "$OUT/sync_check.txt" "$PY" - "$OUT/sync_check.json" <<'EOF'
import json, sys, warnings
import torch
torch.set_num_threads(1)
from earlyprop.bench import CONFIGS, build_ep, random_batches
from earlyprop.dynamics import relax
from earlyprop.rules import EquilibriumProp, Relaxation

dev = torch.device("cuda")
def syncs(fn):
    fn(); fn(); torch.cuda.synchronize()  # warm: kernels loaded, allocator pool grown
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)

out = {}
for name, graphs in [(n, g) for n in ("G", "A", "B", "C") for g in (False, True)]:
    cfg = CONFIGS[name]
    net, rule = build_ep(cfg, dev)
    x, y = random_batches(cfg, dev, count=1)[0]
    kw = dict(eps=cfg.eps, project=cfg.project, nudge_scale=cfg.nudge_scale, method=cfg.method, cuda_graphs=graphs)
    def phase(steps, check_every, **more):
        return lambda: relax(net, net.init_state(x), steps=steps, check_every=check_every, **kw, **more)
    row = {f"free steps={s} check_every={c}": syncs(phase(s, c)) for s, c in ((10, 10), (20, 10), (50, 10), (5, 1000),
                                                                             (50, 1000))}
    row.update({f"nudged steps={s} check_every={c}": syncs(phase(s, c, beta=cfg.beta, target=y))
                for s, c in ((10, 10), (50, 10), (5, 1000), (50, 1000))})
    def batch(free, nudged):
        r = EquilibriumProp(cfg.beta, cfg.variant, Relaxation(eps=cfg.eps, free_steps=free, nudge_steps=nudged,
                            project=cfg.project, nudge_scale=cfg.nudge_scale, method=cfg.method, check_every=1000,
                            cuda_graphs=graphs))
        def f():
            for p in net.parameters():
                p.grad = None
            r.compute_grads(net, x, y)
        return f
    row["compute_grads 5+2 steps, check_every=1000"] = syncs(batch(5, 2))
    row["compute_grads 60+12 steps, check_every=1000"] = syncs(batch(60, 12))
    v = list(row.values())
    per_check = v[1] - v[0]
    row["ok"] = bool(per_check <= 1 and v[2] == v[0] + 4 * per_check and v[3] == v[4] and v[7] == v[8]
                     and v[9] == v[10])
    name = f"{name} cuda_graphs" if graphs else name
    out[name] = row
    print(name, json.dumps(row, indent=1), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
print("all ok:", all(r["ok"] for r in out.values()))
EOF

# 2b. what the CUDA graphs cost before they pay: the first batches of a fresh network, with and without
step "graphs cost" 60 "$OUT/graph_cost.txt" "$PY" scripts/gpu_graph_cost.py G,A,B,C "$OUT/graph_cost.json"

# 3. G with TF32 matmuls (the default run above is plain fp32)
step "tf32 bench cuda G" 40 "$OUT/bench_cuda_G_tf32.txt" "${BENCH[@]}" --configs G --tf32 ${REP[@]+"${REP[@]}"} \
    --json-out "$OUT/bench_cuda_G_tf32.json"

# 3b. issue 6's conv benchmark (configs/mnist-conv.toml's net, batch 64, centered EP; N: the async relaxation)
step "conv bench cuda M,N" 60 "$OUT/bench_cuda_M.txt" "${BENCH[@]}" --configs M,N ${REP[@]+"${REP[@]}"} \
    --json-out "$OUT/bench_cuda_M.json"

# 4. this machine's CPU, 1 thread (a quiet host, unlike the shared development VM); the first calls compile the
#    kernels (numba), which the warm-up batches absorb
step "cpu bench A,B,C,D" 90 "$OUT/bench_cpu_here.txt" "$PY" -m earlyprop bench --device cpu \
    --configs A,B,C,D --json-out "$OUT/bench_cpu_here.json"

# 5. the README's main job on the device: digits, the seed's STDP rule, then backprop
step "train digits cuda" 90 "$OUT/train_cuda.txt" "$PY" -m earlyprop train --device cuda --no-progress
step "train digits cuda without graphs" 90 "$OUT/train_cuda_no_graphs.txt" "$PY" -m earlyprop train --device cuda \
    --no-progress --no-cuda-graphs
echo "total seconds=$SECONDS" | tee -a "$SUMMARY" >&2
