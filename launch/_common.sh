# shellcheck shell=bash
# Shared helpers for the launch scripts; source it, do not run it.
#
#   run CMD ARGS...   print "+ CMD ARGS..." (each argument quoted with printf %q) and run it; with --dry-run only
#                     print it, on stdout, and run nothing. Outside dry-run the line goes to stderr, like set -x.
#   run_sh STRING     the same for a line of shell (pipes, redirections, export): printed as is, run with eval.
#                     Quote every variable part with q first.
#   take_value "$@"   for a flag that needs a value: accepts "--flag VALUE" and "--flag=VALUE"; sets FLAG_VALUE
#                     and FLAG_SHIFT (how many words to shift), or dies naming the flag.
#   die MSG           "<script>: error: MSG" on stderr and exit 2.
#
# Works with bash 3.2 (macOS) and later: no mapfile, no ${x@Q}, no empty "${array[@]}" under set -u.

PROG=${PROG:-$(basename "$0")}
DRY_RUN=${DRY_RUN:-0}
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

warn() {
  printf '%s: warning: %s\n' "$PROG" "$*" >&2
}

note() {
  printf '%s: note: %s\n' "$PROG" "$*" >&2
}

# q ARGS...: the arguments as one line of shell that the shell splits back into exactly these words. Each is
# quoted with printf %q, except that a printable word that needs quoting is put in '...' instead (a single quote
# in it written '\''), which means the same and is easier to read.
q() {
  local out="" arg qarg sq="'\\''"
  for arg in "$@"; do
    qarg=$(printf '%q' "$arg")
    if [ "$qarg" != "$arg" ] && [[ $arg != *[![:print:]]* ]]; then
      qarg="'${arg//\'/$sq}'"
    fi
    out+="${out:+ }$qarg"
  done
  printf '%s' "$out"
}

run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+ %s\n' "$(q "$@")"
    return 0
  fi
  printf '+ %s\n' "$(q "$@")" >&2
  "$@"
}

run_sh() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+ %s\n' "$1"
    return 0
  fi
  printf '+ %s\n' "$1" >&2
  eval "$1"
}

# shellcheck disable=SC2034  # FLAG_VALUE and FLAG_SHIFT are read by the caller
take_value() {
  local flag=$1
  case $flag in
    --*=*)
      FLAG_VALUE=${flag#*=}
      FLAG_SHIFT=1
      flag=${flag%%=*}
      ;;
    *)
      if [ $# -lt 2 ]; then
        die "$flag needs a value"
      fi
      case $2 in
        --*) die "$flag needs a value, got the flag '$2' instead" ;;
      esac
      FLAG_VALUE=$2
      FLAG_SHIFT=2
      ;;
  esac
  if [ -z "$FLAG_VALUE" ]; then
    die "$flag needs a non-empty value"
  fi
}

# unknown_arg ARG: the error for anything the parser did not recognise.
unknown_arg() {
  case $1 in
    -*) die "unknown flag '${1%%=*}'" ;;
    *) die "unexpected argument '$1' (all options are --flags)" ;;
  esac
}

# require_cmd NAME HINT: outside dry-run, die unless NAME is on PATH.
require_cmd() {
  if [ "$DRY_RUN" != 1 ] && ! command -v "$1" >/dev/null 2>&1; then
    die "'$1' not found on PATH: $2"
  fi
}

# split_command STRING: split a command line into the array CMD_WORDS much as the shell splits words
# (quotes and backslashes honoured, nothing expanded or run; uses xargs). Dies if it cannot be split.
split_command() {
  local line=$1 word err
  CMD_WORDS=()
  if ! err=$(printf '%s\n' "$line" | xargs printf '%.0s' 2>&1 >/dev/null); then
    die "cannot split --command into words: ${err:-xargs failed}: $line"
  fi
  while IFS= read -r -d '' word; do
    CMD_WORDS+=("$word")
  done < <(printf '%s\n' "$line" | xargs printf '%s\0')
  if [ "${#CMD_WORDS[@]}" -eq 0 ] || [ -z "${CMD_WORDS[0]}" ]; then
    die "--command is empty"
  fi
}

# check_command_has_no_workdir STRING: the scripts add --workdir themselves.
check_command_has_no_workdir() {
  case " $1" in
    *" --workdir"*) die "--command must not contain --workdir; pass it with the script's --workdir flag: $1" ;;
  esac
}

# absolute_path PATH: PATH made absolute against the current directory (gs://... and absolute paths unchanged).
absolute_path() {
  case $1 in
    gs://* | /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$(pwd)" "${1#./}" ;;
  esac
}
