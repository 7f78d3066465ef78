#!/usr/bin/env bash
# Everything `make test` checks, one step after another, each timed. A failed
# step does not stop the others; the last line counts them, with every pytest
# test and every molecule scenario counted one by one:
#   summary: N passed, N failed
# The exit status is 0 only when nothing failed.
set -u
cd "$(dirname "$0")/.."
BIN=.venv/bin
LOGDIR=.cache/test-all
mkdir -p "$LOGDIR"
passed=0
failed=0
failures=()

step() {
  local name=$1
  shift
  local start=$SECONDS
  echo "=== ${name}"
  if "$@"; then
    passed=$((passed + 1))
    echo "=== ${name}: ok ($((SECONDS - start)) s)"
  else
    failed=$((failed + 1))
    failures+=("${name}")
    echo "=== ${name}: FAILED ($((SECONDS - start)) s)"
  fi
}

# pytest counts its own tests: add them, not the step.
run_pytest() {
  local start=$SECONDS out="${LOGDIR}/pytest.log" rc
  echo "=== pytest"
  "${BIN}/pytest" -p no:cacheprovider 2>&1 | tee "${out}"
  rc=${PIPESTATUS[0]}
  local line tests_passed tests_failed
  line=$(grep -E '^=+ .*(passed|failed|error).* in [0-9.]+s' "${out}" | tail -n 1)
  tests_passed=$(grep -oE '[0-9]+ passed' <<<"${line}" | awk '{s += $1} END {print s + 0}')
  tests_failed=$(grep -oE '[0-9]+ (failed|errors?)' <<<"${line}" | awk '{s += $1} END {print s + 0}')
  passed=$((passed + ${tests_passed:-0}))
  failed=$((failed + ${tests_failed:-0}))
  if [ "${rc}" -ne 0 ]; then
    [ "${tests_failed:-0}" -gt 0 ] || failed=$((failed + 1))
    failures+=("pytest (exit ${rc})")
  fi
  echo "=== pytest: exit ${rc} ($((SECONDS - start)) s)"
}

step yamllint "${BIN}/yamllint" -s .
step ansible-lint "${BIN}/ansible-lint" --profile production
step ruff "${BIN}/ruff" check .
step mypy "${BIN}/mypy"
step "vermin (Python 3.9 floor of files/ses_mailer.py)" \
  "${BIN}/vermin" -t=3.9- --no-tips --violations files/ses_mailer.py
run_pytest
for scenario in iam default e2e; do
  step "molecule ${scenario}" "${BIN}/molecule" test -s "${scenario}"
done

if [ "${failed}" -gt 0 ]; then
  echo "failed steps: ${failures[*]}"
fi
echo "summary: ${passed} passed, ${failed} failed"
[ "${failed}" -eq 0 ]
