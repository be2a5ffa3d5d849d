#!/usr/bin/env bash
# Run the 'eval' stage of a recipe: scripts/eval.sh RECIPE [key=value ...]
set -euo pipefail
recipe=${1:?usage: $0 RECIPE [key=value ...]}; shift
exec vlrl stage eval "$recipe" "$@"
