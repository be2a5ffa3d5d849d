#!/usr/bin/env bash
# Run the 'data' stage of a recipe: scripts/data.sh RECIPE [key=value ...]
set -euo pipefail
recipe=${1:?usage: $0 RECIPE [key=value ...]}; shift
exec vlrl stage data "$recipe" "$@"
