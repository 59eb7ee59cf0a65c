#!/usr/bin/env bash
# Make the demo's certificates (pki/) and digits data (demo/) on the host, next to this file.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -f pki/ca.pem ]; then
  tdamil-certs init --out pki --server-name coordinator.example.org
  tdamil-certs issue --pki pki --site site_a
  tdamil-certs issue --pki pki --site site_b
fi
# containers run as uid 10001: let that uid read the keys it needs (still not world-readable)
if [ "$(id -u)" = 0 ]; then
  chown 10001 pki/server.key pki/sites/site_a/site_a.key pki/sites/site_b/site_b.key
fi
tdamil-certs check --cert pki/server.pem --ca pki/ca.pem --host coordinator.example.org --key pki/server.key
"$PY" - <<'PYEOF'
from pathlib import Path
from tdamil.federation.demo import write_demo_federation
if not Path("demo/coordinator/manifest.csv").is_file():
    write_demo_federation("demo", num_sites=2)
    print("demo data written to demo/")
PYEOF
