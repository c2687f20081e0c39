#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): on one CUDA GPU, under 8 minutes, it writes
# benchmarks/results/gpu_check.json and re-renders benchmarks/RESULTS.md with its rows.
#
#   bash benchmarks/gpu_check.sh                 # every section
#   bash benchmarks/gpu_check.sh --sections fused_loss,vllm
#   bash benchmarks/gpu_check.sh --dry-run       # CPU, tiny sizes (results in outputs/gpu-check-dry-run/)
#
# Needs a CUDA build of torch in .venv (docs/llm.md §2); vLLM is optional (its section is skipped without it).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
"$PY" benchmarks/gpu_check.py "$@"
status=$?
case " $* " in
  *" --dry-run "*) ;;                               # a dry run leaves RESULTS.md alone
  *) "$PY" benchmarks/run_all.py --no-run || status=1 ;;
esac
exit $status
