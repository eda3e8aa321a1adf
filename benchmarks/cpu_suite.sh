#!/usr/bin/env bash
# The CPU figures of benchmarks/RESULTS.md (issue 14), in one run on quiet cores:
#   bash benchmarks/cpu_suite.sh [--no-roofline] [LOG]        (default LOG: runs/cpu_suite.log)
# 1. each study loop against this CPU's fp32 matmul ceiling, one thread (bench_cpu_roofline, + torch.compile)
# 2. CPU seconds of `ssr --help` and `ssr finetune --help` (bench_cli_startup, best of 5)
# 3. the README's quickstart, wall seconds per stage and the numbers it prints, at the default threads (one per
#    core) and at one thread
# --no-roofline skips 1 (minutes, with torch.compile's warm-up), for re-measuring start-up and the quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOFLINE=1
if [[ "${1:-}" == "--no-roofline" ]]; then ROOFLINE=0; shift; fi
LOG=${1:-runs/cpu_suite.log}
mkdir -p "$(dirname "$LOG")"
{
  echo "# cpu_suite $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  if [[ $ROOFLINE == 1 ]]; then
    echo '$ python benchmarks/bench_cpu_roofline.py --threads 1 --compile'
    python benchmarks/bench_cpu_roofline.py --threads 1 --compile
  fi
  echo '$ python benchmarks/bench_cli_startup.py --runs 5'
  python benchmarks/bench_cli_startup.py --runs 5
  for threads in 0 1; do
    echo "\$ ssr pipeline recipes/quickstart.toml --set run.threads=$threads (fresh run folder)"
    rm -rf runs/quickstart
    start=$(date +%s.%N)
    ssr pipeline recipes/quickstart.toml --set run.threads=$threads > runs/cpu_suite_quickstart.log 2>&1
    end=$(date +%s.%N)
    python - "$start" "$end" <<'PY'
import json, sys
s = json.load(open("runs/quickstart/summary.json"))
print(f"quickstart wall {float(sys.argv[2]) - float(sys.argv[1]):.1f} s; stages:",
      ", ".join(f"{k} {v}" for k, v in s["stages"].items()))
rec, probe = s["eval"]["reconstruction"], s["probe"]
k = probe["psnr_vs_k"]
print(f"  reconstruction PSNR {rec['psnr']:.2f} dB, SSIM {rec['ssim']:.3f} ({rec['num_images']} crops); probe PSNR "
      f"k=1 {k[0]:.2f}, k={len(k) // 2} {k[len(k) // 2 - 1]:.2f}, k={len(k)} {k[-1]:.2f} dB; Ā error "
      f"{probe['dynamics_error']:.3f} (no change {probe['dynamics_error_no_change']:.3f})")
PY
  done
} 2>&1 | tee "$LOG"
