"""Reading images from an OCI distribution registry: references, auth challenges, manifests and indexes.

    oci://registry.example:5000/team/app:v1            a tag
    oci://registry.example:5000/team/app@sha256:...     a digest (manifest or blob)

A registry on a loopback address (or named in ``insecure``) is spoken to over plain
HTTP, any other over HTTPS. Auth follows the registry's ``WWW-Authenticate``
challenge: ``Bearer`` (a token from the realm, anonymous or with the username and
password) or ``Basic`` (the username and password themselves). An image index is
resolved to the manifest of ``platform`` (``os/arch[/variant]``, default
linux/amd64).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp

from damselfly.core.errors import BackendError, InvalidArgument
from damselfly.security.policy import refusal_in

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[:2]
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')
_DIGEST = re.compile(r"^[a-z0-9]+:[a-f0-9]{32,}$")


def registry_scheme(registry: str, insecure: tuple[str, ...] | list[str] = ()) -> str:
    """``http`` for a registry on loopback or named in ``insecure`` (host:port), else ``https``."""
    host = registry.rsplit(":", 1)[0].strip("[]") if not registry.endswith("]") else registry.strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return "http" if loopback or registry in insecure else "https"


@dataclass(frozen=True)
class Reference:
    scheme: str  # http or https
    registry: str  # host[:port]
    repository: str
    tag: str = ""
    digest: str = ""

    @classmethod
    def parse(cls, url: str, insecure: tuple[str, ...] = ()) -> Reference:
        if url.startswith("oci://"):
            rest = url[len("oci://") :]
        elif "/v2/" in url:  # a registry API url: https://host/v2/repo/manifests/ref
            parts = urlsplit(url)
            repo, _, ref = parts.path[len("/v2/") :].rpartition("/manifests/")
            if not repo or not ref:
                raise InvalidArgument(f"not a manifest url: {url!r}")
            at = "@" if _DIGEST.match(ref) else ":"
            plain = (parts.netloc,) if parts.scheme == "http" else ()
            return cls.parse(f"oci://{parts.netloc}/{repo}{at}{ref}", insecure=insecure + plain)
        else:
            raise InvalidArgument(f"not an oci:// reference: {url!r}")
        registry, _, path = rest.partition("/")
        if not registry or not path:
            raise InvalidArgument(f"oci reference {url!r} needs oci://REGISTRY/REPOSITORY[:TAG|@DIGEST]")
        digest = tag = ""
        if "@" in path:
            path, _, digest = path.partition("@")
            if not _DIGEST.match(digest):
                raise InvalidArgument(f"bad digest {digest!r} in {url!r}")
        elif ":" in path.rsplit("/", 1)[-1]:
            path, _, tag = path.rpartition(":")
        if not re.fullmatch(r"[a-z0-9]+(?:[._/-][a-z0-9]+)*", path):
            raise InvalidArgument(f"bad repository {path!r} in {url!r}")
        scheme = registry_scheme(registry, insecure)
        return cls(scheme, registry, path, tag or ("" if digest else "latest"), digest)

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.registry}/v2/{self.repository}"

    def manifest_url(self, ref: str | None = None) -> str:
        return f"{self.base}/manifests/{ref or self.digest or self.tag}"

    def blob_url(self, digest: str) -> str:
        return f"{self.base}/blobs/{digest}"


@dataclass
class Resolved:
    manifest_url: str
    manifest_digest: str
    config: str
    layers: list[tuple[str, int]] = field(default_factory=list)  # (digest, size)
    authorization: str = ""  # the header value that worked, to fetch the blobs with


class RegistryClient:
    """Manifests, tags and blobs of one repository, answering the registry's auth challenges."""

    def __init__(self, session: aiohttp.ClientSession, username: str = "", password: str = ""):
        self.session = session
        self.username = username
        self.password = password
        self.authorization = ""

    async def answer_challenge(self, challenge: str, ref: Reference) -> str:
        """The Authorization value that answers a registry's ``WWW-Authenticate`` challenge."""
        kind, _, params = challenge.partition(" ")
        if kind.lower() == "basic":
            if not self.username:
                raise BackendError(f"{ref.registry} wants a username and password", status_code=401)
            raw = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            return f"Basic {raw}"
        if kind.lower() != "bearer":
            raise BackendError(f"{ref.registry} asks for unsupported auth {kind!r}", status_code=401)
        fields = dict(_CHALLENGE.findall(params))
        realm = fields.pop("realm", "")
        if not realm:
            raise BackendError(f"{ref.registry} sent a Bearer challenge without a realm", status_code=401)
        fields.setdefault("scope", f"repository:{ref.repository}:pull")
        headers = {}
        if self.username:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        async with self.session.get(f"{realm}?{urlencode(fields)}", headers=headers) as r:
            if r.status >= 400:
                raise BackendError(f"token endpoint {realm} refused: {r.status}", status_code=r.status)
            body = await r.json(content_type=None)
        token = body.get("token") or body.get("access_token")
        if not token:
            raise BackendError(f"token endpoint {realm} gave no token", status_code=401)
        return f"Bearer {token}"

    async def get(self, url: str, ref: Reference, accept: tuple[str, ...] = ()) -> tuple[bytes, dict[str, str]]:
        headers = {"Accept": ", ".join(accept)} if accept else {}
        for attempt in range(2):
            if self.authorization:
                headers["Authorization"] = self.authorization
            try:
                async with self.session.get(url, headers=headers) as r:
                    if r.status == 401 and attempt == 0 and "WWW-Authenticate" in r.headers:
                        self.authorization = await self.answer_challenge(r.headers["WWW-Authenticate"], ref)
                        continue
                    if r.status >= 400:
                        raise BackendError(f"registry answered {r.status} for {url}", status_code=r.status)
                    return await r.read(), dict(r.headers)
            except aiohttp.ClientError as exc:
                refused = refusal_in(exc)  # the source policy refused the address it resolved to
                if refused is not None:
                    raise refused from None
                raise BackendError(f"cannot reach registry {ref.registry}: {exc}") from None
        raise BackendError(f"registry {ref.registry} refused the credentials for {url}", status_code=401)

    async def resolve(self, ref: Reference, platform: str = "linux/amd64") -> Resolved:
        url = ref.manifest_url()
        body, headers = await self.get(url, ref, MANIFEST_TYPES)
        manifest = _json(body, url)
        digest = headers.get("Docker-Content-Digest", ref.digest)
        if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
            want = platform.split("/")
            for m in manifest.get("manifests", []):
                p = m.get("platform", {})
                have = [p.get("os", ""), p.get("architecture", "")] + ([p["variant"]] if "variant" in p else [])
                if have[: len(want)] == want:
                    digest = m["digest"]
                    url = ref.manifest_url(digest)
                    body, _ = await self.get(url, ref, MANIFEST_TYPES)
                    manifest = _json(body, url)
                    break
            else:
                raise BackendError(f"{ref.repository} has no image for platform {platform}", status_code=404)
        try:
            layers = [(layer["digest"], int(layer.get("size", 0))) for layer in manifest["layers"]]
            config = manifest["config"]["digest"]
        except (KeyError, TypeError) as exc:
            raise BackendError(f"manifest {url} is not an image manifest: missing {exc}") from None
        return Resolved(url, digest, config, layers, self.authorization)


def _json(body: bytes, url: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise BackendError(f"{url} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BackendError(f"{url} is not a manifest")
    return value
