#!/usr/bin/env bash
# Set-up on a fresh Debian/Ubuntu machine: system packages (when run as root with
# apt), a virtualenv at ${DAMSELFLY_VENV:-.venv} with damselfly and its test extras.
#   bash scripts/setup.sh && . .venv/bin/activate
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
venv="${DAMSELFLY_VENV:-.venv}"
# rdma-core's pyverbs: the rdma transport's verbs binding is checked against it (no device needed);
# a registry, skopeo, umoci and containerd: the proxy and registry-mirror tests pull real images;
# iproute2 (ip, tc): the swarm test and benchmark shape links between network namespaces
system_packages=(python3-pyverbs docker-registry skopeo umoci containerd iproute2)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${system_packages[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
else
    echo "setup: not root or no apt-get; skipping system packages (${system_packages[*]})" >&2
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e '.[test,quic,webrtc]'
# An editable install leaves damselfly's own modules uncompiled, and where PYTHONDONTWRITEBYTECODE
# is set every scheduler and daemon start compiled them again (0.2-0.3 CPU-s each)
"$venv/bin/python" -m compileall -q damselfly
# Debian's pyverbs is built for the system python3; share it when the versions match
site="$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
if [ -d /usr/lib/python3/dist-packages/pyverbs ] && [ "$("$venv/bin/python" -c 'import sys; print(sys.version_info[:2])')" = "$(/usr/bin/python3 -c 'import sys; print(sys.version_info[:2])' 2>/dev/null)" ]; then
    ln -sfn /usr/lib/python3/dist-packages/pyverbs "$site/pyverbs"
fi
echo "setup: done; now: . $venv/bin/activate"
