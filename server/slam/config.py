"""Validated configuration shared by the CLI, the engine, the server and the operator's pod template.

Every setting lives here once. `ServerSettings` reads `SLAM_*` environment variables, so the operator can
configure a pod with environment variables and a user can do the same with flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PositionMode = Literal["original", "cache"]
# The cache policies, in the order of slam.cache's registry (which is built from this tuple). Kept here,
# torch-free, so that the operator validates settings without the engine.
POLICY_NAMES = ("full", "streaming", "slam", "snapkv", "h2o")


class CacheConfig(BaseModel):
    """How one request's KV cache is compressed.

    `budget` bounds the tokens kept per layer and KV head in the active cache (None: unbounded, only
    for `full`). `position_mode="cache"` stores keys before rotation and numbers positions inside the
    cache, which lets generation run past the model's trained context length.
    """

    model_config = {"extra": "forbid"}

    policy: str = "slam"
    budget: int | None = Field(default=256, ge=1)
    sink: int = Field(default=4, ge=0)
    recent: int = Field(default=64, ge=1)
    position_mode: PositionMode = "original"

    @model_validator(mode="after")
    def _check(self) -> CacheConfig:
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(sorted(POLICY_NAMES))}")
        if self.policy != "full":
            if self.budget is None:
                raise ValueError(f"policy {self.policy!r} needs a budget")
            if self.budget < self.sink + self.recent:
                raise ValueError(
                    f"budget ({self.budget}) must be at least sink + recent ({self.sink} + {self.recent})"
                )
        return self

    @property
    def bounded(self) -> bool:
        return self.policy != "full"


class EngineConfig(BaseModel):
    """Settings of the decoding engine, independent of HTTP."""

    model_config = {"extra": "forbid"}

    model: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = "float32"
    device: str = "auto"
    max_batch: int = Field(default=8, ge=1)
    prefill_chunk: int = Field(default=512, ge=1)
    max_prompt_tokens: int = Field(default=32768, ge=1)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    # Pool columns per slot (the largest budget a request may ask for); None: the cache's budget, or
    # max_model_len for `full`.
    max_budget: int | None = Field(default=None, ge=2)
    max_model_len: int | None = Field(default=None, ge=2)  # None: the model's trained length
    # Where the `slam` policy keeps evicted tokens: "auto" picks the measured default of the device.
    reserve_device: Literal["auto", "cuda", "cpu"] = "auto"
    # "auto": int8 on GPUs serving requests past 32K tokens, else the cache's dtype (model.resolve_reserve_dtype).
    reserve_dtype: Literal["auto", "bfloat16", "int8"] = "auto"
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    # Launch a decode step before the previous one is postprocessed, so the host's work overlaps the device's
    # (auto: with CUDA graphs; "on" also on CPUs, where it only reorders the work, as the tests use it).
    async_scheduling: Literal["auto", "on", "off"] = "auto"
    # GPUs: small decode-step functions through torch.compile, slam's placement in Triton; CPUs: slam's
    # selection tail and placement as C++ ops (cache/cpu_kernels.py).
    compile: bool = True
    # slam: each layer runs two-stage selection's stage one every `select_every` decode steps (staggered) and
    # re-ranks its chunks' tokens in between; exact selection (short reserves) picks at every step.
    select_every: int = Field(default=1, ge=1)
    # slam: two-stage selection scores chunks of `select_chunk` reserve tokens by their key bounds and
    # rescores the tokens of the best `select_oversample` x middle's worth of chunks; 0: score all exactly;
    # None: paired with select_every (oversample_for).
    select_chunk: int = Field(default=8, ge=1)
    select_oversample: int | None = Field(default=None, ge=0)
    # ... once the reserve's capacity is this many times the candidates (oversample x budget): where two stages
    # cost less than scoring every token, on an H100 and on 2 CPU cores alike (docs/benchmarks.md, "Two stages
    # from the start do not pay at 32K" and "A new CPU, and two stages at 8K on it").
    select_min_ratio: int = Field(default=4, ge=1)


MEASURED_MIDDLE = 188  # budget 256's middle columns (sink 4, recent 64), where the oversampling was measured


def oversample_for(every: int, oversample: int | None, middle: int = MEASURED_MIDDLE) -> int:
    """Two-stage selection's oversampling: as set, else paired with the refresh interval. Chunks chosen at a
    refresh serve the next r - 1 queries too; at r = 4 eight middles' worth of them lost two needles of exact
    recall's six at 8K on the H100, sixteen lost one (docs/benchmarks.md, "r = 4 with more candidates").
    Those counts were measured for a middle of 188 columns. A needle needs its chunk among the best few hundred,
    a number that does not follow the middle, so any middle keeps as many candidate tokens (and at least twice
    its picks): budget 2048 rescores 2 x 1,980 where 16 x would be the whole reserve at 32K, and budget 128's 60
    columns rescore 26 x (r <= 2), where 8 x lost two needles of exact recall's nine at 4K on the CPU."""
    if oversample is not None:
        return oversample
    if middle < 1:
        return 2  # no critical columns (budget = sink + recent): nothing is ever selected
    return -(-max(2 * middle, candidate_floor(every, None)) // middle)


def candidate_floor(every: int, oversample: int | None) -> int:
    """Candidate tokens a step rescores at least, however narrow its middle, when the oversampling is unset: budget
    256's measured 8 x 188 (16 x from r = 3). A pool sized for a wider max_budget takes its multiple from that
    budget (2 at 2048), which a request of a narrower budget would otherwise get too. Set oversampling: 0 (none)."""
    if oversample is not None:
        return 0
    return (8 if every <= 2 else 16) * MEASURED_MIDDLE


def _split_commas(value: Any) -> Any:
    """Lists from flags and the environment are comma-separated (`--allowed-policies slam,streaming`)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]


class CheckpointConfig(BaseSettings):
    """Where and how often checkpoints go. Credentials come from SLAM_S3_ACCESS_KEY / SLAM_S3_SECRET_KEY
    and are SecretStr, so they never appear in repr, logs or model_dump_json."""

    model_config = SettingsConfigDict(env_prefix="SLAM_CHECKPOINT_", extra="ignore", populate_by_name=True)

    endpoint: str = "127.0.0.1:9000"  # host:port, no scheme
    bucket: str = "slam-checkpoints"
    prefix: str = "slam"
    secure: bool = False
    region: str = "us-east-1"
    access_key: SecretStr = Field(default=SecretStr(""), validation_alias="SLAM_S3_ACCESS_KEY")
    secret_key: SecretStr = Field(default=SecretStr(""), validation_alias="SLAM_S3_SECRET_KEY")
    slot: int = Field(default=0, ge=0)
    epoch: int = Field(default=0, ge=0)  # fencing: this pod's tenure of the slot; objects go under <slot>/<epoch>/
    advertise_url: str = ""
    interval_tokens: int = Field(default=16, ge=1)
    retention: int = Field(default=2, ge=1)  # complete versions kept per request
    include_reserve: bool = True  # False: a restored slam request recalls only tokens evicted after restore
    reserve_int8: bool = False  # True: 4x smaller reserve segments, but restored outputs may differ
    queue_size: int = Field(default=8, ge=1)  # pending snapshots (each holds a copy of an active cache)
    retries: int = Field(default=3, ge=1)  # attempts per store operation
    backoff_s: float = Field(default=0.2, gt=0)  # first retry delay, doubled per attempt
    backoff_max_s: float = Field(default=10.0, gt=0)  # ceiling of the checkpointer's re-upload delay
    timeout_s: float = Field(default=10.0, gt=0)  # connect and read timeout of one HTTP request


class ServerSettings(BaseSettings):
    """Everything `slam serve` takes; each field is also the environment variable `SLAM_<FIELD>`.

    The one settings tree of the server: the engine, cache and checkpoint settings are built from these
    fields (`engine_config()`, `cache_config()`, `checkpoint_config()`), never read from the environment on
    their own. `slam serve` generates one flag per field from this class, with the description as its help.
    """

    model_config = SettingsConfigDict(env_prefix="SLAM_", extra="ignore")

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    model: str | None = Field(default=None, description="model directory or .gguf file "
                              "(default: the embedded SmolLM2-135M-Instruct)")
    served_model_name: str | None = Field(default=None, description="model id clients use (default: the model's name)")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = Field(
        default="auto", description="weights: auto (int8 on the CPU, float32 on GPUs), float32, bfloat16, float16, "
        "or int8 (int8 weights per output channel, CPU only: about twice as fast to decode as float32, with its "
        "perplexity and NIAH)")
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N")
    policy: str = Field(default="slam", description="default cache policy: full, streaming, slam, snapkv, h2o")
    budget: int = Field(default=256, ge=1, description="default tokens kept per layer and KV head")
    sink: int = Field(default=4, ge=0, description="default first tokens never evicted")
    recent: int = Field(default=64, ge=1, description="default window of newest tokens")
    position_mode: PositionMode = Field(default="original", description="original, or cache: positions inside "
                                        "the cache, which runs bounded policies past the trained length")
    max_batch: int = Field(default=8, ge=1, description="requests decoded together")
    max_queue: int = Field(default=64, ge=0, description="requests allowed to wait beyond max-batch; "
                           "more get 429 with Retry-After")
    prefill_chunk: int = Field(default=512, ge=1, description="prompt tokens processed per step")
    max_prompt_tokens: int = Field(default=32768, ge=1, description="longest prompt accepted (400 beyond)")
    max_model_len: int | None = Field(default=None, ge=2, description="longest prompt + max_tokens accepted "
                                      "(400 beyond); default: the model's trained length, unlimited for "
                                      "bounded policies with --position-mode cache")
    allowed_policies: CommaList | None = Field(default=None, description="cache policies a request may ask for "
                                               "in its `slam` field, comma-separated (default: all)")
    max_budget: int | None = Field(default=None, ge=2, description="largest budget a request may ask for in its "
                                   "`slam` field, which sizes the cache pool's slots (default: --budget)")
    max_body_bytes: int = Field(default=8 * 2**20, ge=1024, description="largest request body accepted, in bytes "
                                "(413 beyond)")
    max_n: int = Field(default=8, ge=1, description="largest `n` (choices per request) accepted")
    resume_grace_s: float = Field(default=30.0, ge=0, description="seconds a streaming request keeps running "
                                  "after its client dropped, so it can resume with GET /v1/requests/{id}/stream")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="on SIGTERM without checkpoints: seconds "
                                   "running requests get to finish before the server exits")
    reserve_device: Literal["auto", "cuda", "cpu"] = Field(default="auto", description="where slam keeps "
                                                           "evicted tokens: auto, cuda, cpu")
    reserve_dtype: Literal["auto", "bfloat16", "int8"] = Field(default="auto", description="evicted tokens "
                                                               "in the cache's dtype (bfloat16: bfloat16 on GPUs, "
                                                               "float32 on CPUs), or int8 with per-token scales; "
                                                               "auto: int8 on GPUs whose max model length passes "
                                                               "32K, else the cache's dtype")
    enforce_eager: bool = Field(default=False, description="true: no CUDA graphs for decode steps")
    async_scheduling: Literal["auto", "on", "off"] = Field(default="auto", description="launch each decode step "
                                                           "before the previous one is postprocessed, so the "
                                                           "host's work overlaps the GPU's (auto: with CUDA "
                                                           "graphs and the reserve on the GPU)")
    compile: bool = Field(default=True, description="GPUs: fuse the decode step's small functions with "
                          "torch.compile and place slam's tokens with a Triton kernel; CPUs: slam's selection and "
                          "placement as C++ ops built on first use (false: eager torch kernels, no compile time)")
    select_every: int = Field(default=1, ge=1, description="slam: decode steps between a layer's refreshes of "
                              "two-stage selection's chunks (exact selection picks at every step)")
    select_chunk: int = Field(default=8, ge=1, description="slam: reserve tokens per chunk whose key bounds "
                              "the first selection stage scores")
    select_oversample: int | None = Field(default=None, ge=0, description="slam: chunks worth this many times "
                                          "the critical columns are rescored exactly (0: score every reserve token; "
                                          "unset: as many candidate tokens as 8 x budget 256's 188 critical "
                                          "columns, 16 x when select_every is 3 or more, and at least twice the "
                                          "columns)")
    select_min_ratio: int = Field(default=4, ge=1, description="slam: two-stage selection starts once the reserve "
                                  "holds this many times the candidates; before, every token is scored")
    api_key_file: Path | None = Field(default=None, description="file with one API key per line; requests "
                                      "must send one as Authorization: Bearer")
    # Checkpoints (design.md section 3). No endpoint: checkpointing is off.
    s3_endpoint: str | None = Field(default=None, description="S3 host:port for checkpoints (none: "
                                    "checkpointing off); credentials from SLAM_S3_ACCESS_KEY / SLAM_S3_SECRET_KEY")
    s3_bucket: str = Field(default="slam", description="checkpoint bucket")
    s3_prefix: str = Field(default="checkpoints", description="object prefix of checkpoints")
    s3_secure: bool = Field(default=False, description="true: HTTPS to the S3 endpoint")
    # Credentials only from the environment (SLAM_S3_ACCESS_KEY / SLAM_S3_SECRET_KEY / SLAM_REPLICA_TOKEN):
    # never flags, which show up in `ps`; SecretStr keeps them out of reprs and logs.
    s3_access_key: SecretStr = SecretStr("")
    s3_secret_key: SecretStr = SecretStr("")
    replica_token: SecretStr = SecretStr("")
    slot: int = Field(default=0, ge=0, description="checkpoint slot this replica writes")
    # Fencing: the operator bumps a slot's epoch at every failover; checkpoints live under <slot>/<epoch>/.
    slot_epoch: int = Field(default=0, ge=0, description="fencing epoch of the slot, raised by the operator "
                            "at every failover")
    advertise_url: str | None = Field(default=None, description="URL other replicas proxy resumed streams to "
                                      "(default http://HOST:PORT)")
    peer_domain: CommaList | None = Field(default=None, description="hosts (or domains, e.g. the headless "
                                          "Service's) a resumed stream may be proxied to, comma-separated "
                                          "(default: the host of --advertise-url)")
    checkpoint_interval: int = Field(default=16, ge=1, description="generated tokens between checkpoints "
                                     "of a request")
    checkpoint_max_age: int = Field(default=86400, ge=60, description="seconds after which a checkpoint that "
                                    "was not refreshed is deleted by the slot's owner")
    restore_slot: int | None = Field(default=None, ge=0, description="resume the requests checkpointed in "
                                     "this slot before admitting new ones")

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        self.cache_config()  # raises on an inconsistent cache setting
        if self.api_key_file is not None and not self.api_key_file.is_file():
            raise ValueError(f"api key file {self.api_key_file} does not exist")
        if self.restore_slot is not None and not self.s3_endpoint:
            raise ValueError("--restore-slot needs --s3-endpoint")
        unknown = [p for p in self.allowed_policies or [] if p not in POLICY_NAMES]
        if unknown:
            raise ValueError(f"allowed_policies: unknown policy {unknown[0]!r}; choose from {', '.join(POLICY_NAMES)}")
        if self.allowed_policies is not None and self.policy not in self.allowed_policies:
            raise ValueError(f"allowed_policies must include the default policy {self.policy!r}")
        if self.max_budget is not None and self.policy != "full" and self.max_budget < self.budget:
            raise ValueError(f"max_budget ({self.max_budget}) is below the default budget ({self.budget})")
        self.checkpoint_config()  # the checkpoint library validates its own fields
        return self

    @property
    def public_url(self) -> str:
        return self.advertise_url or f"http://{self.host}:{self.port}"

    @property
    def peers(self) -> list[str]:
        """Hosts or domains a resumed stream may be proxied to."""
        return self.peer_domain or [urlsplit(self.public_url).hostname or self.host]

    @property
    def policies(self) -> list[str]:
        return list(self.allowed_policies or POLICY_NAMES)

    @property
    def budget_limit(self) -> int:
        return self.max_budget or self.budget

    def checkpoint_config(self) -> CheckpointConfig | None:
        """The checkpoint library's config built from these settings (one source of truth); None when off."""
        if not self.s3_endpoint:
            return None
        # Every field is given (its default unless set here): CheckpointConfig would otherwise also read
        # its own SLAM_CHECKPOINT_* variables, a second environment prefix; these settings are the only source.
        defaults = {name: f.get_default(call_default_factory=True) for name, f in CheckpointConfig.model_fields.items()}
        return CheckpointConfig(**defaults | dict(
            endpoint=self.s3_endpoint, bucket=self.s3_bucket, prefix=self.s3_prefix, secure=self.s3_secure,
            access_key=self.s3_access_key, secret_key=self.s3_secret_key, slot=self.slot,
            epoch=self.slot_epoch, advertise_url=self.public_url, interval_tokens=self.checkpoint_interval,
        ))

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            policy=self.policy,
            budget=None if self.policy == "full" else self.budget,
            sink=self.sink,
            recent=self.recent,
            position_mode=self.position_mode,
        )

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            dtype=self.dtype,
            device=self.device,
            max_batch=self.max_batch,
            prefill_chunk=self.prefill_chunk,
            max_prompt_tokens=self.max_prompt_tokens,
            cache=self.cache_config(),
            reserve_device=self.reserve_device,
            reserve_dtype=self.reserve_dtype,
            enforce_eager=self.enforce_eager,
            async_scheduling=self.async_scheduling,
            compile=self.compile,
            select_every=self.select_every,
            select_chunk=self.select_chunk,
            select_oversample=self.select_oversample,
            select_min_ratio=self.select_min_ratio,
            max_budget=self.max_budget,
            max_model_len=self.max_model_len,
        )
