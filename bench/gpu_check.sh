#!/usr/bin/env bash
# The CUDA paths on a machine with a GPU, in one short run (under 8 minutes); not run in CI
# (CI has no GPU). Prints, for each check, the CUDA time next to the CPU time and their ratio:
#   1. every scheme, one epoch of CraterCNN on digits: `lottery train --set device=...`
#   2. a seed pack of 64 vs one seed at a time on CUDA (bench/pack.py --device cuda --quick)
#   3. the demo sweep (configs/demo.yaml, 60 trials) with `device: cuda` and 0.25 GPU per trial
# Exits non-zero if there is no CUDA device or any step fails.
#
#     bench/gpu_check.sh            (from the checkout, after `make install`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TMP=$(mktemp -d /tmp/gpu-check.XXXX)
trap 'rm -rf "$TMP"' EXIT
export RAY_USAGE_STATS_ENABLED=0 LOTTERY_HOME="$TMP/home"
unset MLFLOW_TRACKING_URI

$PY -c 'import sys, torch; ok = torch.cuda.is_available(); print("CUDA:", torch.cuda.get_device_name(0) if ok else "none"); sys.exit(0 if ok else 1)'

seconds() { # seconds COMMAND...: run it quietly, print its wall time
  local start end
  start=$(date +%s.%N)
  "$@" >"$TMP/last.log" 2>&1 || { cat "$TMP/last.log" >&2; return 1; }
  end=$(date +%s.%N)
  $PY -c "print(f'{$end - $start:.2f}')"
}
ratio() { $PY -c "print(f'{$1 / $2:.2f}')"; }
declare -A t

echo "== 1. every scheme, one epoch (repr: two, one per stage; CraterCNN 8 filters, digits) =="
for scheme in baseline batchnorm randomout repr; do
  extra=(--epochs 1)
  [ "$scheme" = repr ] && extra=(--epochs 2 --set scheme.s1=1 --set scheme.s2=1 --set scheme.n_iter=1)
  for device in cpu cuda; do
    t[$device]=$(seconds $PY -m orchestrator train --scheme "$scheme" --dataset digits \
      --set model.filters=8 --set device=$device "${extra[@]}" --no-mlflow --out "$TMP/train-$device")
  done
  echo "$scheme: cpu ${t[cpu]} s, cuda ${t[cuda]} s, cuda/cpu $(ratio "${t[cuda]}" "${t[cpu]}")x"
done

echo "== 2. a pack of 64 seeds vs one seed at a time, on CUDA =="
$PY bench/pack.py --device cuda --quick | tail -n 12

echo "== 3. the demo sweep (60 trials) with device: cuda =="
$PY - "$TMP/demo_cuda.yaml" <<'EOF'
import sys, yaml
doc = yaml.safe_load(open("configs/demo.yaml"))
doc["name"], doc["base"]["device"], doc["resources"] = "demo-cuda", "cuda", {"cpu": 1, "gpu": 0.25}
yaml.safe_dump(doc, open(sys.argv[1], "w"))
EOF
sweep=$(seconds $PY -m orchestrator sweep "$TMP/demo_cuda.yaml")
grep -E "finished" "$TMP/last.log" | tail -n 1
$PY -m orchestrator aggregate "$LOTTERY_HOME/demo-cuda" >/dev/null
echo "demo sweep on cuda: $sweep s for 60 trials"
$PY - "$LOTTERY_HOME/demo-cuda" <<'EOF'
import json, pathlib, sys
devices = {json.loads(p.read_text())["device"] for p in pathlib.Path(sys.argv[1]).glob("trials/*/result.json")}
print("devices recorded by the trials:", sorted(devices))
sys.exit(0 if devices and all(d.startswith("cuda") for d in devices) else 1)
EOF
