#!/usr/bin/env bash
# Run the 'pretrain' stage of a recipe: scripts/pretrain.sh RECIPE [key=value ...]
set -euo pipefail
recipe=${1:?usage: $0 RECIPE [key=value ...]}; shift
exec vlrl stage pretrain "$recipe" "$@"
