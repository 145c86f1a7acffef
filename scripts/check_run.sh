# Sourced by scripts/gpu_check.sh and scripts/metal_check.sh: one step of a check report.
# run TITLE COMMAND...: prints the command, its output, exit status and wall time in a fenced
# block, and sets status=1 if it failed.
run() {
    local title=$1
    shift
    printf '\n## %s\n\n```\n$ %s\n' "$title" "$*"
    local start=$SECONDS
    "$@" 2>&1
    local rc=$?
    printf '[exit %s, %s s]\n```\n' "$rc" "$((SECONDS - start))"
    [ "$rc" -eq 0 ] || status=1
}
