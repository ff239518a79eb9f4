#!/usr/bin/env bash
# The CUDA path, checked for real on a GPU host in one command:
#
#   scripts/gpu_check.sh            (OUT=<dir> chooses where the results go)
#
# Needs an NVIDIA GPU and driver, a CUDA toolkit (nvcc), CMake, a C++ compiler, make and
# Python 3.11+, and no network: Python packages come from the folder that
# scripts/prepare_gpu_carry.sh fills where PyPI is reachable (GPU_CARRY, default
# build/gpu-carry; its wheels are for the Python version it was told, 3.12 by default).
# The steps, in order, each timed and logged to OUT/<step>.log (env, build, model: setup.log):
#
#   env        the GPU, driver, nvcc, CMake and Python
#   build      a virtual environment from the carried wheels; llama-cpp-python compiled from the
#              carried sdist with -DGGML_CUDA=on -DGGML_RPC=on for this GPU's compute capability
#              (CUDA_ARCHITECTURES overrides); the project installed into it
#   model      a synthetic qwen3moe GGUF with Qwen3-30B-A3B's layer shapes (2048 wide, 128
#              experts of 768 with 8 used, 32 query and 4 KV heads of 128, 40960 context) and
#              GPU_CHECK_LAYERS layers (default 4, about 5 GB) instead of 48
#   offload    llama.cpp's own load log must show it used the CUDA device and filled a CUDA
#              buffer with the model; then the server: its log must say gpu_offload=True,
#              nvidia-smi must show the memory it took, and a streamed request must come back;
#              then the server with --n-cpu-moe 2 (the experts of layers 0 and 1 in host
#              memory): its log must report llama.cpp putting those 6 tensors in host memory, it
#              must take at least 1 GiB less GPU memory than with every layer on the GPU, and
#              a streamed request must come back
#   rpc        the RPC scale-out path: the RPC tests of tests/test_deploy.py, with a real worker
#   contracts  `make contracts` against the synthetic model (the whole suite if no such target)
#   bench      `make bench` on the synthetic model when the project has it (GPU_CHECK_BENCH_ARGS,
#              default "--concurrency 1,4 --reps 2 --rounds 1", sizes it), else
#              python -m bench.stream through the server
#
# OUT (default build/gpu-check/out) receives gpu_check.json (each step's status and seconds, and
# the facts found), findings.json (the contract run's) and the logs. The environment and the
# model stay in build/gpu-check/, so a rerun on the same machine skips the build and the model;
# GPU_CHECK_STEPS="contracts bench" runs only the steps named. Exit status 0 when every step
# that ran passed.

# The step functions are called by name (step_$name) from run_step, which shellcheck cannot see.
# shellcheck disable=SC2329
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2
work=${GPU_CHECK_DIR:-$root/build/gpu-check}
out=${OUT:-$work/out}
carry=${GPU_CARRY:-$root/build/gpu-carry}
python=${PYTHON:-python3}
layers=${GPU_CHECK_LAYERS:-4}
steps=${GPU_CHECK_STEPS:-env build model offload rpc contracts bench}
port=${GPU_CHECK_PORT:-18000}
venv=$work/venv
vpy=$venv/bin/python
model=$work/qwen3moe-30b-a3b-shapes-${layers}-layers.gguf
server_pid=

mkdir -p "$work" "$out"
out=$(cd "$out" && pwd)
# At most 8 files come back from a lent machine: env, build and model share setup.log.
rm -f "$out"/{summary,setup,offload,rpc,contracts,bench}.log "$out"/{gpu_check,findings}.json
: >"$work/steps.tsv"
: >"$work/facts.tsv"
rm -f "$work/bench.json"
export PYTHONUNBUFFERED=1
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH=/usr/local/cuda/bin:$PATH
fi

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$out/summary.log"; }
fact() {
    printf '%s\t%s\n' "$1" "$2" >>"$work/facts.tsv"
    log "  $1: $2"
}
report() { "$python" "$root/scripts/gpu_check_report.py" "$work" "$out/gpu_check.json"; }
vpip() {
    if "$vpy" -m pip --version >/dev/null 2>&1; then
        "$vpy" -m pip "$@"
    else  # a venv made without ensurepip: the host's pip installs into it
        "$python" -m pip --python "$vpy" "$@"
    fi
}
link_host_packages() {  # the distributions in host-packages.txt, from $python into the venv
    local site
    [ -s "$carry/host-packages.txt" ] || return 0
    site=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # shellcheck disable=SC2046
    "$python" - "$site" $(cat "$carry/host-packages.txt") <<'PY'
import importlib.metadata
import sys
from pathlib import Path

site = Path(sys.argv[1])
for name in sys.argv[2:]:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        print(f"the host's Python has no {name}: not linked")
        continue
    # Top-level entries: the package, its .dist-info, vendored libraries (numpy.libs, ...).
    tops = {f.parts[0] for f in dist.files or () if f.parts and f.parts[0] != ".."}
    for top in sorted(tops):
        source, target = Path(dist.locate_file(top)), site / top
        if source.exists() and not target.exists():
            target.symlink_to(source)
    print(f"linked {name} {dist.version} from {dist.locate_file('')}")
PY
}
find_cuda_gaps() {  # sets gap_args: CMake arguments for what a partial CUDA toolkit lacks
    # A toolkit assembled from NVIDIA's pip wheels (nvcc, cudart) may have no cuBLAS and no
    # driver stub to link against: take cuBLAS from the host Python's nvidia wheels (PyTorch
    # brings them) and link the installed driver itself.
    local home=${CUDA_HOME:-${CUDA_PATH:-/usr/local/cuda}} cublas driver lib lt include
    gap_args=
    if ! find -L "$home" -name 'libcublas.so*' 2>/dev/null | grep -q .; then
        cublas=$("$python" - <<'PY'
import site
from pathlib import Path

for base in site.getsitepackages():
    for library in sorted(Path(base).glob("nvidia/*/lib/libcublas.so.*")):
        lt = sorted(library.parent.glob("libcublasLt.so.*"))
        if lt and (library.parent.parent / "include" / "cublas_v2.h").is_file():
            print(library, lt[0], library.parent.parent / "include")
            raise SystemExit
PY
)
        if [ -n "$cublas" ]; then
            read -r lib lt include <<<"$cublas"
            gap_args+=" -DCUDA_cublas_LIBRARY=$lib -DCUDA_cublasLt_LIBRARY=$lt"
            gap_args+=" -DCMAKE_CUDA_FLAGS=-I$include"
            # ... and the loader must find it when llama_cpp is imported: kept for reruns.
            dirname "$lib" >"$work/cuda-library-path"
        fi
    fi
    if ! find -L "$home" -name 'libcuda.so' 2>/dev/null | grep -q .; then
        driver=$( (ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF}'
            ls /usr/local/nvidia/lib64/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 \
                /usr/lib64/libcuda.so.1 2>/dev/null) | head -n 1)
        if [ -n "$driver" ]; then
            gap_args+=" -DCUDA_cuda_driver_LIBRARY=$driver"
        else  # no driver library to link: build without CUDA's virtual memory management
            gap_args+=" -DGGML_CUDA_NO_VMM=ON"
        fi
    fi
}
use_cuda_library_path() {
    if [ -s "$work/cuda-library-path" ]; then
        LD_LIBRARY_PATH=$(cat "$work/cuda-library-path")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        export LD_LIBRARY_PATH
    fi
}
gpu_memory_used_mib() {
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1 | tr -d ' '
}

start_server() {  # start_server LOG [FLAGS...]: the real server on the synthetic model
    local server_log=$1 tries
    shift
    "$venv/bin/qwen3-moe-serve" --model "$model" --port "$port" "$@" >"$server_log" 2>&1 &
    server_pid=$!
    for tries in $(seq 1 600); do
        if QWEN3_MOE_SERVE_PORT=$port "$vpy" deploy/healthcheck.py /health >/dev/null 2>&1; then
            echo "server healthy after ${tries}s"
            return 0
        fi
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 1
    done
    echo "server did not become healthy"
    return 1
}
stop_server() {
    if [ -n "$server_pid" ]; then
        kill -TERM "$server_pid" 2>/dev/null
        wait "$server_pid" 2>/dev/null
        server_pid=
    fi
}
trap stop_server EXIT
trap 'exit 143' TERM INT
use_cuda_library_path

# -- steps: each prints to its own log and returns non-zero on failure ------------------------

step_env() {
    nvidia-smi || return 1
    fact gpu "$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap \
        --format=csv,noheader | head -n 1)"
    fact cuda_driver_supports "$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p')"
    fact nvcc "$(nvcc --version 2>&1 | tail -n 1)"
    fact cmake "$(cmake --version 2>&1 | head -n 1)"
    fact python "$("$python" --version 2>&1)"
    fact cpus "$(nproc)"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
        echo "$python is older than 3.11"
        return 1
    }
}

step_build() {
    local sdist arch cmake_args started
    if [ -x "$vpy" ] && "$vpy" -c 'import llama_cpp, sys
sys.exit(not (llama_cpp.llama_supports_gpu_offload() and llama_cpp.llama_supports_rpc()))' \
        2>/dev/null; then
        echo "reusing $venv: its llama_cpp has CUDA and RPC"
    else
        sdist=$(find "$carry" -maxdepth 1 -name 'llama_cpp_python-*.tar.gz' | head -n 1)
        if [ ! -d "$carry/wheels" ] || [ -z "$sdist" ]; then
            echo "nothing carried in $carry: run scripts/prepare_gpu_carry.sh where PyPI is" \
                "reachable, and bring $carry along"
            return 1
        fi
        rm -rf "$venv"
        "$python" -m venv "$venv" || "$python" -m venv --clear --without-pip "$venv" || return 1
        # The carried wheels, exactly (the versions the project is tested with); then the
        # packages left to the host's Python, linked in; then a check that every requirement
        # is met, which installs nothing when it is.
        vpip install --no-index --no-deps "$carry"/wheels/*.whl || return 1
        link_host_packages || return 1
        vpip install --no-index --find-links "$carry/wheels" \
            --requirement "$carry/requirements.txt" || return 1
        arch=${CUDA_ARCHITECTURES:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader \
            | head -n 1 | tr -d ' .')}
        rm -f "$work/cuda-library-path"
        find_cuda_gaps
        use_cuda_library_path
        cmake_args="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DGGML_RPC=on"
        cmake_args+=" -DLLAVA_BUILD=off$gap_args"
        fact cmake_args "$cmake_args"
        started=$(date +%s)
        # The whole compile log is long (every nvcc command line): its tail is enough here.
        CMAKE_ARGS=$cmake_args CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
            vpip install --no-index --find-links "$carry/wheels" --no-build-isolation \
            --no-cache-dir --verbose "$sdist" >"$work/llama-build.log" 2>&1
        local status=$?
        tail -n 300 "$work/llama-build.log"
        fact llama_build_seconds "$(($(date +%s) - started))"
        [ "$status" = 0 ] || return 1
    fi
    vpip install --no-index --no-deps --no-build-isolation --editable "$root" || return 1
    # `make VENV=...` must not try to install from an index.
    touch "$venv/.installed" "$venv/.installed-dev" "$venv/.installed-bench"
    fact llama_cpp "$("$vpy" -c 'import llama_cpp as l
print(l.__version__, "offload", l.llama_supports_gpu_offload(), "rpc", l.llama_supports_rpc())')"
}

step_model() {
    if [ -s "$model" ]; then
        echo "reusing $model"
    else
        "$vpy" -m bench.model --out "$model.partial" --n-layer "$layers" \
            --n-embd 2048 --n-expert 128 --n-expert-used 8 --n-ff-exp 768 \
            --n-head 32 --n-head-kv 4 --head-dim 128 --n-ctx 40960 || return 1
        mv "$model.partial" "$model"
    fi
    fact model "$model, $(du -m "$model" | cut -f1) MiB, $layers layers"
}

step_offload() {
    local probe=$work/offload-probe.log server_log=$work/offload-server.log
    local moe_log=$work/offload-moe-server.log
    local device buffer before after full_mib moe_mib overrides ok=0
    # llama.cpp's own account of the load: verbose=True lets its log through.
    "$vpy" - "$model" >"$probe" 2>&1 <<'PY'
import sys

import llama_cpp

llm = llama_cpp.Llama(
    model_path=sys.argv[1], n_gpu_layers=-1, n_ctx=4096, flash_attn=True, verbose=True
)
completion = llm.create_completion("The", max_tokens=8, temperature=0)
print("completion:", repr(completion["choices"][0]["text"]))
llm.close()
PY
    grep -E 'CUDA devices|Device [0-9]+:|using device|offload|model buffer size|completion:' \
        "$probe"
    # "offloaded N/M layers" is printed even when no GPU device exists (the layers then stay on
    # the CPU): the proof is the device llama.cpp chose and the CUDA buffer it filled.
    device=$(grep -oE 'using device CUDA[0-9]+ \([^)]*\)' "$probe" | head -n 1)
    buffer=$(grep -oE 'CUDA0 model buffer size = *[0-9.]+ MiB' "$probe" | tr -s ' ')
    fact llama_cpp_device "${device:-no CUDA device used}"
    fact llama_cpp_offload "$(grep -oE 'offloaded [0-9]+/[0-9]+ layers to GPU' "$probe")"
    fact llama_cpp_cuda_buffer "${buffer:-no CUDA0 model buffer}"
    [ -n "$device" ] && [ -n "$buffer" ] && ok=$((ok + 1))

    # The server, as README.md tells an operator to check it.
    before=$(gpu_memory_used_mib)
    if start_server "$server_log" --flash-attn on; then
        after=$(gpu_memory_used_mib)
        full_mib=$((after - before))
        fact server_gpu_memory_mib "$full_mib"
        nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
        "$vpy" -m bench.stream --url "http://127.0.0.1:$port" --requests 1 \
            --max-tokens 32 && ok=$((ok + 1))
        [ "$full_mib" -gt 1024 ] && ok=$((ok + 1))
    fi
    stop_server
    cat "$server_log"
    fact server_log "$(grep -oE 'loaded .*gpu_offload=[A-Za-z]+\)' "$server_log" | head -n 1)"
    grep -q 'gpu_offload=True' "$server_log" && ok=$((ok + 1))

    # Expert offload, as docs/llama-knobs.md tells an 8-16 GB GPU's operator to run it.
    before=$(gpu_memory_used_mib)
    if start_server "$moe_log" --flash-attn on --parallel 1 --n-cpu-moe 2; then
        after=$(gpu_memory_used_mib)
        moe_mib=$((after - before))
        fact moe_server_gpu_memory_mib "$moe_mib"
        "$vpy" -m bench.stream --url "http://127.0.0.1:$port" --requests 1 \
            --max-tokens 32 && ok=$((ok + 1))
        [ -n "$full_mib" ] && [ "$moe_mib" -lt "$((full_mib - 1024))" ] && ok=$((ok + 1))
    fi
    stop_server
    cat "$moe_log"
    overrides=$(grep -oE 'tensor overrides: [^"]*' "$moe_log" | head -n 1)
    fact moe_tensor_overrides "${overrides:-no tensor overrides reported}"
    # Host memory: CPU, or the pinned CUDA_Host buffers llama.cpp prefers on a CUDA build.
    [[ $overrides =~ ^tensor\ overrides:\ 6\ tensors\ to\ (CPU|CUDA_Host)$ ]] && ok=$((ok + 1))
    [ "$ok" = 7 ]
}

step_rpc() {
    local result=$work/rpc-pytest.txt
    QWEN3_MOE_FINDINGS=$work/findings-rpc.json "$vpy" -m pytest -p no:cacheprovider -rA \
        tests/test_deploy.py -k rpc | tee "$result"
    local status=${PIPESTATUS[0]}
    # Skipped is not passed: on this build every RPC test must run.
    if grep -qE '^SKIPPED|[0-9]+ skipped' "$result"; then
        echo "an RPC test was skipped"
        return 1
    fi
    return "$status"
}

step_contracts() {
    local status result=$work/contracts-pytest.txt
    export QWEN3_MOE_GGUF_PATH=$model QWEN3_MOE_FINDINGS=$out/findings.json
    export QWEN3_MOE_TEST_N_THREADS=${QWEN3_MOE_TEST_N_THREADS:-4}
    if make -n VENV="$venv" contracts >/dev/null 2>&1; then
        make --no-print-directory VENV="$venv" contracts | tee "$result"
    else
        echo "no make contracts here: the whole pytest suite instead"
        "$vpy" -m pytest -p no:cacheprovider -q | tee "$result"
    fi
    status=${PIPESTATUS[0]}
    fact contracts_summary "$(grep -E '^=+ .*(passed|failed).* =+$' "$result" | tail -n 1)"
    fact contracts_failed "$(grep -E '^(FAILED|ERROR) ' "$result" | cut -d' ' -f2 | paste -sd' ')"
    return "$status"
}

step_bench() {
    local status
    if make -n VENV="$venv" bench >/dev/null 2>&1; then
        # The project's harness, on the synthetic model: results.json lands in gpu_check.json.
        rm -rf "$work/bench"
        make --no-print-directory VENV="$venv" bench ARGS="--models $model --out $work/bench \
            --no-progress ${GPU_CHECK_BENCH_ARGS---concurrency 1,4 --reps 2 --rounds 1}"
        status=$?
        cat "$work/bench/results.md" 2>/dev/null
        cp "$work/bench/results.json" "$work/bench.json" 2>/dev/null
        return "$status"
    fi
    echo "no make bench here: python -m bench.stream through the server instead"
    start_server "$work/bench-server.log" --flash-attn on || {
        cat "$work/bench-server.log"
        return 1
    }
    "$vpy" -m bench.stream --url "http://127.0.0.1:$port" --requests 3 \
        --max-tokens 256 >"$work/bench.json"
    status=$?
    cat "$work/bench.json"
    stop_server
    return "$status"
}

# -- run ----------------------------------------------------------------------------------------

run_step() {
    local name=$1 started status step_log
    case " $steps " in
        *" $name "*) ;;
        *)
            printf '%s\tskipped\t0\tnot in GPU_CHECK_STEPS\n' "$name" >>"$work/steps.tsv"
            return 0
            ;;
    esac
    log "== $name"
    started=$(date +%s)
    case $name in
        env | build | model) step_log=setup.log ;;
        *) step_log=$name.log ;;
    esac
    echo "== $name" >>"$out/$step_log"
    if "step_$name" >>"$out/$step_log" 2>&1; then status=ok; else status=failed; fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - started))" \
        "$step_log" >>"$work/steps.tsv"
    log "== $name: $status in $(($(date +%s) - started))s"
    report
    [ "$status" = ok ]
}

log "gpu_check: results in $out"
failed=0
for step in env build model offload rpc contracts bench; do
    if ! run_step "$step"; then
        failed=1
        case $step in
            env | build | model)
                log "gpu_check: later steps need $step; stopping"
                break
                ;;
        esac
    fi
done
report
log "gpu_check: $([ "$failed" = 0 ] && echo "every step passed" || echo "some step failed")"
exit "$failed"
