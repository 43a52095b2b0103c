#!/usr/bin/env bash
# Run the architecture matrix and self-check tests against the newest releases of torch, transformers, peft,
# lightning and bitsandbytes (and of everything else the project pulls in), in a fresh virtual environment.
# When it passes, the pins in constraints.txt and the upper bounds in pyproject.toml can be raised.
#
# usage: bash tests/newest_releases.sh [--all] [--venv DIR] [--keep] [-- PYTEST_ARGS...]
#   --all        run the whole suite (`-m "not slow and not gpu"`, as `python -m pytest -q` does) instead of $TESTS
#   --venv DIR   make the venv in DIR (created; an existing DIR must be empty or a venv, which is cleared) and keep
#                it; default: a new temporary folder, removed at the end unless --keep
#   --keep       keep the temporary venv (its path is printed)
# environment:
#   TORCH_SPEC   what to ask pip for torch (default `torch`: the newest release pip may install on this machine;
#                a machine-wide pip constraint such as /etc/xdg/pip's torch cap is respected, and said). Split on
#                spaces, so pip options may follow, e.g. TORCH_SPEC="torch==2.13.0" (a CPU wheel on disk) or
#                TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
#   TESTS        test files to run without --all (default: tests/test_architectures.py tests/test_selfcheck.py);
#                files that do not exist yet are named and skipped; if none exists, the whole suite runs
#   PYTHON       interpreter for the venv (default python3)
#   PIP_QUIET    option for pip's install output (default -q; PIP_QUIET= shows all of it)
# Nothing here reads constraints.txt, and the project's own upper bounds are lifted: the project is installed
# with --no-deps and its dependencies (pyproject's, plus the dev extra) by name only, so pip takes their newest
# releases. `pip check` then names what exceeds pyproject's bounds; that is expected and not an error here.
# Exit status: pytest's (0 all passed); 100 when the venv or the install failed. The last line is a summary:
#   newest_releases: torch X transformers X peft X lightning X bitsandbytes X (python X): <pytest's tally> -> PASSED|FAILED
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 100
TESTS=${TESTS:-"tests/test_architectures.py tests/test_selfcheck.py"}
TORCH_SPEC=${TORCH_SPEC:-torch}
PYTHON=${PYTHON:-python3}
ALL=0; KEEP=0; VENV=""; PYTEST_EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --all) ALL=1 ;;
        --keep) KEEP=1 ;;
        --venv) VENV=${2:?--venv needs a folder}; KEEP=1; shift ;;
        --) shift; PYTEST_EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "newest_releases: unknown argument $1 (see --help)" >&2; exit 100 ;;
    esac
    shift
done

say() { echo "newest_releases: $*"; }
fail_install() { say "$1"; say "install failed -> FAILED"; exit 100; }

if [ -z "$VENV" ]; then
    TMP=$(mktemp -d -t finllm-newest.XXXXXX) || exit 100
    VENV=$TMP/venv
    [ "$KEEP" = 1 ] || trap 'rm -rf "$TMP"' EXIT
elif [ -e "$VENV" ] && [ -n "$(ls -A "$VENV")" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
    fail_install "$VENV exists and is neither empty nor a venv; give another --venv"
fi
start=$(date +%s)
say "fresh venv in $VENV"
"$PYTHON" -m venv --clear "$VENV" || fail_install "cannot create a venv with $PYTHON"
PY=$VENV/bin/python
PIP=("$PY" -m pip install --no-input ${PIP_QUIET--q})

# torch first, so that its choice is explicit (and what the machine's pip config allows)
read -ra torch_args <<< "$TORCH_SPEC"
say "pip install ${torch_args[*]}"
"${PIP[@]}" "${torch_args[@]}" || fail_install "torch did not install (TORCH_SPEC=$TORCH_SPEC; a machine-wide pip constraint may cap it: pip config list)"

# the project without its bounds: names (with extras and markers) of pyproject's dependencies and the dev extra
deplist=$("$PY" - <<'EOF'
import re, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in p["dependencies"] + p.get("optional-dependencies", {}).get("dev", []):
    name, rest = re.match(r"\s*([A-Za-z0-9._-]+(?:\[[^\]]*\])?)(.*)", req).groups()
    marker = rest.split(";", 1)[1].strip() if ";" in rest else ""
    print(name + (f"; {marker}" if marker else ""))
EOF
) || fail_install "cannot read pyproject.toml"
mapfile -t deps <<< "$deplist"
say "pip install ${deps[*]}; pip install -e . --no-deps"
"${PIP[@]}" "${deps[@]}" || fail_install "the project's dependencies did not install"
"${PIP[@]}" -e . --no-deps || fail_install "the project did not install"

echo "--- pip check (lines about finllm_pl's own bounds are expected here)"
"$PY" -m pip check
"$PY" -m pip freeze --all > "$VENV/freeze.txt"
echo "--- resolved versions (all: $VENV/freeze.txt)"
MAIN="torch transformers peft lightning bitsandbytes"
# one look-up per main package: the newest release the index has, to show what a cap held back
versions=$("$PY" - $MAIN datasets accelerate huggingface_hub tokenizers safetensors torchmetrics jsonargparse numpy pytest <<'EOF'
import importlib.metadata as md, subprocess, sys
main = set(sys.argv[1:6])
for name in sys.argv[1:]:
    try:
        v = md.version(name)
    except md.PackageNotFoundError:
        v = "-"
    note = ""
    if name in main:
        out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True).stdout
        newest = out.split("(", 1)[1].split(")", 1)[0] if "(" in out else "?"
        if newest != v.split("+")[0]:
            note = f"   (the index has {newest}: capped by this machine's pip config, set by TORCH_SPEC, or held back by a dependency)"
    print(f"{name} {v}{note}")
EOF
)
echo "$versions"
if [ -n "${PIP_CONSTRAINT+set}" ]; then  # replaces the pip config files' constraint
    conf="PIP_CONSTRAINT=$PIP_CONSTRAINT"; files=$PIP_CONSTRAINT
else
    conf=$("$PY" -m pip config list 2>/dev/null | grep -i "constraint" || true)
    files=$(echo "$conf" | sed "s/.*=//; s/'//g")
fi
if [ -n "$conf" ]; then
    say "pip applied a constraint: $conf"
    for f in $files; do [ -f "$f" ] && grep -i '^torch' "$f" | sed 's/^/    /'; done
fi
install_s=$(( $(date +%s) - start ))

# the tests
files=()
if [ "$ALL" = 1 ]; then
    say "running the whole suite (--all)"
else
    for f in $TESTS; do
        if [ -e "$f" ]; then files+=("$f"); else say "$f does not exist yet: skipped"; fi
    done
    if [ ${#files[@]} -eq 0 ]; then
        say "none of TESTS ($TESTS) exists yet: running the whole suite instead"
    fi
fi
log=$VENV/pytest.log
echo "--- $PY -m pytest -q -m \"not slow and not gpu\" $( [ ${#files[@]} -eq 0 ] && [ ${#PYTEST_EXTRA[@]} -eq 0 ] || printf '%q ' "${files[@]}" "${PYTEST_EXTRA[@]}")"
t0=$(date +%s)
"$PY" -m pytest -q -m "not slow and not gpu" -p no:cacheprovider "${files[@]}" "${PYTEST_EXTRA[@]}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
tally=$(grep -E "[0-9]+ (passed|failed|error|errors|skipped|deselected)|no tests ran" "$log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
short=$(echo "$versions" | awk -v main="$MAIN" 'BEGIN{n=split(main,m," "); for(i=1;i<=n;i++) want[m[i]]=1} want[$1]{printf "%s%s %s", sep, $1, $2; sep=" "}')
[ "$rc" = 0 ] && verdict=PASSED || verdict=FAILED
say "install ${install_s}s, tests $(( $(date +%s) - t0 ))s; venv $VENV$([ "$KEEP" = 1 ] || echo ' (removed)')"
echo "newest_releases: $short (python $("$PY" -c 'import platform; print(platform.python_version())')): ${tally:-no pytest tally} -> $verdict"
exit "$rc"
