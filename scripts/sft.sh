#!/usr/bin/env bash
# Run the 'sft' stage of a recipe: scripts/sft.sh RECIPE [key=value ...]
set -euo pipefail
recipe=${1:?usage: $0 RECIPE [key=value ...]}; shift
exec vlrl stage sft "$recipe" "$@"
