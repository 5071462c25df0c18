"""Copy the CRDs from manifests/ (their one source) into the chart: `python charts/sync_crds.py`.

tests/test_chart.py fails when the copies differ, and names this script.
"""

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIES = {"crd.yaml": "slaminferences.yaml", "kopf-peering.yaml": "kopf-peering.yaml"}

if __name__ == "__main__":
    for source, target in COPIES.items():
        shutil.copyfile(ROOT / "manifests" / source, ROOT / "charts" / "slam" / "crds" / target)
        print(f"manifests/{source} -> charts/slam/crds/{target}")
