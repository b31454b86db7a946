"""Container runtimes' registry-mirror configuration: what points containerd, skopeo, podman
or nydus at a daemon's proxy for one registry (``damselfly runtime-config`` prints it).

containerd's ``hosts.toml`` and nydusd's mirror also name the upstream registry to the
proxy, in an ``X-Dragonfly-Registry`` header; skopeo and podman get a ``registries.conf``
mirror entry.
"""

from __future__ import annotations

import json

# the runtimes ``runtime_snippet`` configures
RUNTIMES = ("containerd", "skopeo", "podman", "nydus")


def runtime_snippet(runtime: str, proxy_address: str, registry: str) -> str:
    """The configuration that makes ``runtime`` pull ``registry``'s images through the daemon's
    proxy at ``proxy_address`` (a registry mirror), with where it goes as its first line."""
    host = registry.removeprefix("https://").removeprefix("http://").rstrip("/")
    if registry.startswith("http://"):
        upstream = registry.rstrip("/")  # a plain-HTTP registry (a local one)
    else:
        upstream = "https://registry-1.docker.io" if host == "docker.io" else f"https://{host}"
    plain = upstream.startswith("http://")
    if runtime == "containerd":
        return (
            f'# /etc/containerd/certs.d/{host}/hosts.toml  (config_path = "/etc/containerd/certs.d")\n'
            f'server = "{upstream}"\n\n'
            f'[host."http://{proxy_address}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
            '  [host."http://{0}".header]\n'.format(proxy_address)
            + f'    X-Dragonfly-Registry = ["{upstream}"]\n'
        )
    if runtime in ("skopeo", "podman"):
        return (
            "# /etc/containers/registries.conf (or ~/.config/containers/registries.conf)\n"
            f'[[registry]]\nprefix = "{host}"\nlocation = "{host}"\n' + ("insecure = true\n" if plain else "") + "\n"
            f'[[registry.mirror]]\nlocation = "{proxy_address}"\ninsecure = true\n'
        )
    mirror = {
        "host": f"http://{proxy_address}",
        "auth_through": False,
        "headers": {"X-Dragonfly-Registry": upstream},
        "ping_url": f"http://{proxy_address}/server/ping",
    }
    backend = {"device": {"backend": {"type": "registry", "config": {"mirrors": [mirror]}}}}
    return "# nydusd configuration: the registry backend's mirrors\n" + json.dumps(backend, indent=2) + "\n"
