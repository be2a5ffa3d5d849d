#!/usr/bin/env bash
# Run the 'model' stage of a recipe: scripts/model.sh RECIPE [key=value ...]
set -euo pipefail
recipe=${1:?usage: $0 RECIPE [key=value ...]}; shift
exec vlrl stage model "$recipe" "$@"
