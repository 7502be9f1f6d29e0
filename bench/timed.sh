# Sourced by the bench scripts. `timed NAME COMMAND...` runs COMMAND with its output in
# $WORK/logs/NAME.log, appends "NAME<tab>exit status<tab>seconds" to $WORK/times.tsv
# (and prints it), and returns COMMAND's exit status.
timed() {
  local name=$1 start rc
  shift
  start=$EPOCHREALTIME
  echo "[$(date +%T)] start $name"
  "$@" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  awk -v n="$name" -v rc="$rc" -v s="$start" -v e="$EPOCHREALTIME" \
    'BEGIN { printf "%s\t%s\t%.1f\n", n, rc, e - s }' | tee -a "$WORK/times.tsv"
  return "$rc"
}
