"""``backend:`` of a model (and the TLS settings it shares with listeners): where a
model's requests go. Part of the ``mesh.yaml`` schema (``cmesh.config``), kept in
its own module so each file stays one concern; ``cmesh.config`` re-exports it."""
from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from cmesh.validation import Strict


class TLSConfig(Strict):
    """TLS for a listener (cert/key, plus ca + client_auth for mutual TLS) or for
    client channels (ca to verify servers, cert/key to present with mutual TLS)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    client_auth: bool = False
    server_name: str | None = Field(None, description="override the name checked in server certs")

    @model_validator(mode="after")
    def _complete(self) -> "TLSConfig":
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert: give both cert and key, or neither")
        if self.client_auth and self.ca is None:
            raise ValueError("ca: client_auth requires a CA to verify client certificates")
        return self


class CredentialConfig(Strict):
    """A credential an external backend expects on every call: one header whose value
    comes from an environment variable, read at the entry point (never at import)."""

    header: str = Field("authorization", pattern=r"^[a-z0-9][a-z0-9_.-]*$",
                        description="gRPC metadata key (lower case)")
    env: str = Field(min_length=1, description="environment variable holding the value")
    prefix: str = Field("", description="prepended to the value, e.g. 'Bearer '")


BackendKind = Literal["mesh", "oip", "openai"]
OpenAIApi = Literal["chat", "completions", "embeddings"]

_OIP_ONLY = ("dns", "model_name", "credential")
_OPENAI_ONLY = ("base_url", "api_key_env", "model", "api")
_EXTERNAL = ("tls", "max_inflight_per_endpoint")        # oip and openai


class BackendConfig(Strict):
    """Where a model's requests go (``backend:`` of a model; default ``mesh``).

    ``mesh``: the mesh's own replicas (autoscaler or static ``endpoints``), over the
    data path ``data_path`` (default ``router.data_path``). ``oip``: any Open Inference
    Protocol gRPC server (KServe, MLServer, Triton, NIM) at static ``endpoints`` or every
    address of a DNS name (``dns``, e.g. a Kubernetes Service), called with unary
    ModelInfer (and ModelStreamInfer for streamed calls when ``stream``). ``openai``:
    an OpenAI-compatible HTTP API at ``base_url`` (OpenAI, vLLM, another mesh's router),
    one endpoint, called on ``api`` with the key in ``api_key_env``."""

    kind: BackendKind = "mesh"
    data_path: Literal["stream", "unary"] | None = Field(
        None, description="mesh: how requests reach this model's replicas; None: router.data_path")
    endpoints: list[str] = Field(default_factory=list, description="oip: host:port of each server")
    dns: str | None = Field(None, description="oip: host:port whose every address is a server")
    dns_refresh_s: float = Field(10.0, gt=0, description="oip with dns: how often to re-resolve")
    model_name: str | None = Field(None, min_length=1, description="oip: the server's name for the model "
                                                                   "(default: ours)")
    versions: dict[str, str] = Field(default_factory=dict,
                                     description="oip: our variant -> the server's model version "
                                                 "(absent: the server's default version)")
    stream: bool = Field(False, description="oip: the server implements ModelStreamInfer")
    base_url: str | None = Field(None, description="openai: the API root, e.g. https://api.openai.com/v1")
    api_key_env: str | None = Field(None, min_length=1, description="openai: environment variable holding "
                                                                    "the key sent as 'Authorization: Bearer'")
    model: str | None = Field(None, min_length=1, description="openai: the provider's name for the model "
                                                              "(default: ours)")
    api: OpenAIApi | None = Field(None, description="openai: chat (default), completions or embeddings")
    tls: TLSConfig | None = Field(None, description="oip: TLS to the server (ca, optional cert/key); "
                                                    "openai with https: a CA (and client cert) to trust")
    credential: CredentialConfig | None = None
    max_inflight_per_endpoint: int | None = Field(None, ge=1, description="router's cap per server, e.g. "
                                                  "under a provider's rate limit "
                                                  "(default: deployment.max_inflight_per_replica)")
    spill_over: "BackendConfig | None" = Field(
        None, description="mesh with mode auto: an oip pool that takes what the dedicated pool "
                          "cannot (the serverless pool's place)")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 \
                or parts.query or parts.fragment:
            raise ValueError(f"{v!r} is not an http:// or https:// URL (no query or fragment)")
        return v.rstrip("/")

    @property
    def openai_api(self) -> str:
        return self.api or "chat"

    def _none_of(self, names: tuple[str, ...], rule: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and value != [] and value != {} and value is not False:
                raise ValueError(f"{name}: {rule}")

    @model_validator(mode="after")
    def _kind(self) -> "BackendConfig":
        if self.kind == "mesh":
            self._none_of(_OIP_ONLY, "only for kind 'oip'")
            self._none_of(_EXTERNAL, "only for kinds 'oip' and 'openai'")
            self._none_of(_OPENAI_ONLY, "only for kind 'openai'")
            for name in ("endpoints", "versions"):
                if getattr(self, name):
                    raise ValueError(f"{name}: only for kind 'oip' (mesh replicas: the model's endpoints)")
            if self.stream:
                raise ValueError("stream: only for kind 'oip' (mesh: data_path)")
            if self.spill_over is not None and self.spill_over.kind != "oip":
                raise ValueError("spill_over.kind: must be 'oip'")
            return self
        if self.data_path is not None:
            raise ValueError("data_path: only for kind 'mesh'")
        if self.spill_over is not None:
            raise ValueError("spill_over: only for kind 'mesh'")
        if self.kind == "openai":
            return self._openai()
        self._none_of(_OPENAI_ONLY, "only for kind 'openai'")
        if bool(self.endpoints) == (self.dns is not None):
            raise ValueError("endpoints: kind 'oip' needs exactly one of endpoints or dns")
        for address in [*self.endpoints, *([self.dns] if self.dns else [])]:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"endpoints: {address!r} is not host:port")
        return self

    def _openai(self) -> "BackendConfig":
        if self.base_url is None:
            raise ValueError("base_url: kind 'openai' needs the API's base URL")
        self._none_of(_OIP_ONLY, "only for kind 'oip' (openai: api_key_env, model)")
        self._none_of(("endpoints", "versions", "stream"), "only for kind 'oip' (openai: base_url)")
        if self.tls is not None and not self.base_url.startswith("https://"):
            raise ValueError("tls: only for an https:// base_url")
        return self
