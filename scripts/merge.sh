#!/usr/bin/env bash
# Run the 'merge' stage of a recipe: scripts/merge.sh RECIPE [key=value ...]
set -euo pipefail
recipe=${1:?usage: $0 RECIPE [key=value ...]}; shift
exec vlrl stage merge "$recipe" "$@"
