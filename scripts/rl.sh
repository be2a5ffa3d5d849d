#!/usr/bin/env bash
# Run the 'rl' stage of a recipe: scripts/rl.sh RECIPE [key=value ...]
set -euo pipefail
recipe=${1:?usage: $0 RECIPE [key=value ...]}; shift
exec vlrl stage rl "$recipe" "$@"
