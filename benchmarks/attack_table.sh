#!/usr/bin/env bash
# The attack table (none / KLT / KNT) on one data set, from a finished run's site AEs.
#   bash benchmarks/attack_table.sh FROM_RUN OUT [key-recovery]
# FROM_RUN: a run folder whose site AEs every mode reuses (e.g. a fedseg.attacks.lab run);
# OUT: where the three runs (<name>-none, -klt, -knt) and their attack reports go.
# Add "key-recovery" to run it too (slow at 128 px: the KNT-form fit).
set -euo pipefail
FROM=$1 OUT=$2 EXTRA=${3:-}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
$PY -m fedseg.attacks.lab --from-run "$FROM" --out "$OUT" --modes knt klt none --threads 1
NAME=$(basename "$(ls -d "$OUT"/*-knt)" -knt)
N=$OUT/$NAME
for m in knt klt none; do $PY -m fedseg.cli attack --run "$N-$m" --attack membership; done
attacks="cross-decoder inversion"
[ "$EXTRA" = "key-recovery" ] && attacks="cross-decoder key-recovery inversion"
for a in $attacks; do $PY -m fedseg.cli attack --run "$N-knt" --attack "$a"; done
$PY -m fedseg.cli attack --run "$N-none" --run "$N-klt" --run "$N-knt" --attack tradeoff --out "$OUT"
