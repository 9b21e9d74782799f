# Preflight checks: one copy, inlined into every rendered install script and run by
# `stackbuild doctor`, so the two never disagree. Each check ends in `report STATUS
# NAME MESSAGE`: in the install script a `fail` stops the script (die) and anything else
# is printed; with STACKBUILD_PREFLIGHT_REPORT=1 (doctor) every check runs and prints
# one tab-separated line. Inputs (set before this is sourced): VENV, RENDER_NODE_GLOB,
# SETVARS, ONEAPI_REQUIRED, PYTHON_WINDOW, PYTHON_FITS_CODE, PYTHON_CANDIDATES (array),
# PYTHON_PREFERRED, PYTHON_HINT. This file holds no recipe text.

report() {
    local status="$1" name="$2"
    shift 2
    if [[ "${STACKBUILD_PREFLIGHT_REPORT:-0}" == 1 ]]; then
        printf '%s\t%s\t%s\n' "$status" "$name" "$*"
        return 0
    fi
    if [[ "$status" == fail ]]; then
        die "$*"
    fi
    echo "$*"
}

preflight_user() {
    if [[ "$(id -u)" == 0 && "${STACKBUILD_ALLOW_ROOT:-0}" != 1 ]]; then
        if [[ -n "${SUDO_USER:-}" ]]; then
            report fail user "do not run this script with sudo: the venv would land in $HOME (root's home), not in $SUDO_USER's. Run it as $SUDO_USER: bash $0 (it asks sudo for the package step itself)"
            return 0
        fi
        report fail user "refusing to run as root: the venv is a user venv. Run it as the user who will run vLLM (STACKBUILD_ALLOW_ROOT=1 where root is that user, e.g. a container)"
        return 0
    fi
    if [[ -f "$PWD/vllm/__init__.py" ]]; then
        report fail user "a vllm/ folder in $PWD would shadow the installed vllm (\`import vllm\` would load $PWD/vllm). Run this script from another directory"
        return 0
    fi
    # Python's venv writes its own path unquoted into bin/activate on releases without the
    # CVE-2024-9287 fix, so `source activate` would run a `$(...)` in the path: refuse such paths.
    case "$VENV" in
        *[\$\`\"\'\\!]* | *[[:cntrl:]]*)
            report fail user "the venv path $VENV holds shell metacharacters (\$ \` \" ' \\ ! or control characters); Python's venv writes it unquoted into bin/activate, so set STACKBUILD_VENV to a plain path"
            return 0 ;;
    esac
    report ok user "user $(id -un), working directory $PWD"
}

preflight_render_node() {
    local nodes node node_group node_mode other_rw session_groups user_name
    shopt -s nullglob
    # shellcheck disable=SC2206 # the glob is meant to expand
    nodes=($RENDER_NODE_GLOB)
    shopt -u nullglob
    if [[ ${#nodes[@]} -eq 0 ]]; then
        report fail render-node "no GPU render node ($RENDER_NODE_GLOB): the Intel GPU driver (xe or i915) is not loaded. Check \`lspci | grep -i vga\` and the kernel driver, then re-run"
        return 0
    fi
    node="${nodes[0]}"
    node_group="$(stat -c %G "$node")"
    if [[ "$node_group" == UNKNOWN || "$node_group" == root ]]; then
        node_group=render
    fi
    node_mode="$(stat -c %a "$node")"
    other_rw=0
    case "${node_mode: -1}" in 6|7) other_rw=1 ;; esac
    session_groups=" $(id -nG) "
    user_name="$(id -un)"
    if [[ $other_rw == 0 && "$session_groups" != *" $node_group "* ]]; then
        if [[ " $(id -nG "$user_name") " == *" $node_group "* ]]; then
            report fail render-node "you are in group $node_group but this login session is not: log out and back in (or run \`newgrp $node_group\`), then re-run"
            return 0
        fi
        report fail render-node "$user_name cannot open $node (group $node_group): run \`sudo usermod -aG $node_group \$USER\`, then log out and back in, and re-run"
        return 0
    fi
    if [[ ! -r "$node" || ! -w "$node" ]]; then
        report fail render-node "$user_name cannot open $node for reading and writing (mode $node_mode, group $node_group)"
        return 0
    fi
    report ok render-node "render node $node (group $node_group) is usable"
}

python_fits() {
    "$1" -c "$PYTHON_FITS_CODE" 2>/dev/null
}

# Sets PY to the interpreter the venv is built from.
preflight_python() {
    local candidate found
    PY=""
    if [[ -n "${STACKBUILD_PYTHON:-}" ]]; then
        if ! python_fits "$STACKBUILD_PYTHON"; then
            report fail python "STACKBUILD_PYTHON=$STACKBUILD_PYTHON is not a Python in $PYTHON_WINDOW"
            return 0
        fi
        PY="$STACKBUILD_PYTHON"
    else
        for candidate in "${PYTHON_CANDIDATES[@]}"; do
            if command -v "$candidate" >/dev/null 2>&1 && python_fits "$candidate"; then
                PY="$(command -v "$candidate")"
                break
            fi
        done
    fi
    if [[ -z "$PY" ]]; then
        found="none"
        if command -v python3 >/dev/null 2>&1; then
            found="python3 is $(python3 -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?')"
        fi
        report fail python "no Python in $PYTHON_WINDOW ($found); torch XPU wheels exist only for those. Get one: $PYTHON_HINT, or \`uv python install $PYTHON_PREFERRED\`; then re-run (or point STACKBUILD_PYTHON at it)"
        return 0
    fi
    report ok python "using $PY ($("$PY" -c 'import platform; print(platform.python_version())'))"
}

preflight_oneapi() {
    if [[ -f "$SETVARS" ]]; then
        # setvars.sh is not `set -u` clean, and sourced through a pipe its variables
        # would be lost in a subshell: source it directly, with -u off, and check after.
        set +u
        # shellcheck disable=SC1090
        if ! source "$SETVARS" --force; then
            set -u
            report fail oneapi "sourcing $SETVARS failed"
            return 0
        fi
        set -u
        if [[ -z "${ONEAPI_ROOT:-}" && -z "${CMPLX_ROOT:-}" ]]; then
            report fail oneapi "sourcing $SETVARS did not set ONEAPI_ROOT: the oneAPI install is incomplete"
            return 0
        fi
        report ok oneapi "oneAPI from ${ONEAPI_ROOT:-$CMPLX_ROOT}"
    elif [[ "$ONEAPI_REQUIRED" == 1 ]]; then
        report fail oneapi "oneAPI setvars.sh not found at $SETVARS: this recipe builds kernels from source and needs the oneAPI Base Toolkit (set STACKBUILD_ONEAPI_SETVARS if it lives elsewhere)"
    else
        report ok oneapi "no $SETVARS: fine, the torch XPU wheels carry their own runtime"
    fi
}
