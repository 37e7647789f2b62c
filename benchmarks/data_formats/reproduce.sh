#!/usr/bin/env bash
# Reproduce results.{json,md} here (issue 36: the prepared-dataset format, chosen by measurement). ~40 min on a loaded 2-vCPU box; needs root for the cgroup part.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
if [ ! -x venv/bin/python ]; then
  python3.11 -m venv venv
  # streaming 0.13 pulls torchvision; a CPU torch wheel + PyPI torchvision do not match, so use the PyPI pair.
  venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1" "mosaicml-streaming==0.13.0" \
      "numpy==2.1.3" "pyarrow==26.0.1" "datasets==5.0.1" "litdata==0.2.76" psutil pillow
fi
mv -f results.json "results.json.bak.$(date +%s)" 2>/dev/null || true
venv/bin/python formats.py run --n 50000 --hw 32 --tag n50000_32x32 --rounds 2 --warm-epochs 3
venv/bin/python formats.py run --n 20000 --hw 64 --tag n20000_64x64 --rounds 1 --warm-epochs 3
venv/bin/python formats.py run --n 50000 --hw 32 --tag n50000_32x32_extra --formats npmemmap,arrow_ipc --readers npmemmap,npmemmap_madv_random,np_pread,arrow_ipc_npview,arrow_ipc_npview_madv_random --rounds 2
venv/bin/python formats.py cgroup --n 350000 --hw 32 --limit-mb 256 --formats npmemmap,arrow_ipc,hf_binary --read-timeout 120
venv/bin/python formats.py cgroup --n 262144 --hw 64 --limit-mb 768 --formats npmemmap,mds,litdata \
    --readers np_pread,npmemmap_madv_random,mds_getitem,litdata_getitem --read-timeout 150
venv/bin/python formats.py cgroup --n 174762 --hw 64 --limit-mb 512 --formats npmemmap,litdata \
    --readers np_pread,litdata_getitem --read-timeout 150 --write-outside
venv/bin/python formats.py ulimit
venv/bin/python formats.py remote
venv/bin/python formats.py report
