"""Device capabilities (edge config sync): the versioned site config, its loading and caching.

The cloud serves the config at `GET /api/edges/{edge_id}/config`; the agent caches the raw
JSON in its state directory so it starts without the cloud. The demo site's config ships
in `edge/sites/<edge_id>.json`.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import urllib.error
import urllib.request
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import msgspec
from msgspec import Meta, Struct

from edge.errors import ConfigError
from schemas.identifiers import NAME, schema_pattern

ConfigName = Annotated[str, Meta(pattern=schema_pattern(NAME))]
CONFIG_FILE = "config.json"
MAX_CONFIG_BYTES = 1024 * 1024


class DataType(StrEnum):
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    FLOAT32 = "float32"


REGISTER_COUNT: dict[DataType, int] = {
    DataType.INT16: 1,
    DataType.UINT16: 1,
    DataType.INT32: 2,
    DataType.UINT32: 2,
    DataType.FLOAT32: 2,
}
# Raw (register) value limits of the integer types.
RAW_LIMITS: dict[DataType, tuple[float, float]] = {
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.FLOAT32: (-3.4e38, 3.4e38),
}

Access = Literal["read", "write", "read_write"]
RegisterKind = Literal["holding", "input"]
WordOrder = Literal["big", "little"]


class Channel(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One value of a device: engineering value = raw register value x `scale`."""

    name: ConfigName
    data_type: DataType
    unit: Annotated[str, Meta(max_length=16)] = ""
    access: Access = "read"
    register: RegisterKind = "holding"
    address: Annotated[int, Meta(ge=0, le=65535)]
    word_order: WordOrder = "big"  # "big": high word first
    scale: Annotated[float, Meta(gt=0)] = 1.0
    min: float | None = None  # in `unit`
    max: float | None = None
    verify: bool = True  # read back after a write (where the channel is readable)
    # Longest config_override allowed on this channel (s); None: the agent's maximum.
    max_override_s: Annotated[int, Meta(gt=0)] | None = None

    @property
    def writable(self) -> bool:
        return self.access in ("write", "read_write") and self.register == "holding"

    @property
    def readable(self) -> bool:
        return self.access in ("read", "read_write")


class Device(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A Modbus TCP device and its channels."""

    device_id: ConfigName
    protocol: Literal["modbus_tcp"] = "modbus_tcp"
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 502
    unit_id: Annotated[int, Meta(ge=0, le=255)] = 1
    timeout_s: Annotated[float, Meta(gt=0, le=60)] = 1.0
    retries: Annotated[int, Meta(ge=0, le=10)] = 1
    channels: list[Channel] = []

    def channel(self, name: str) -> Channel | None:
        return next((c for c in self.channels if c.name == name), None)


class Controller(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A Core Cycle controller: its modes and whether it runs at start."""

    name: ConfigName
    modes: Annotated[list[ConfigName], Meta(min_length=1)]
    default_mode: str
    running: bool = True


class SiteConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The versioned capability config of one edge."""

    version: Annotated[str, Meta(min_length=1, max_length=64)]
    edge_id: ConfigName
    devices: list[Device] = []
    controllers: list[Controller] = []

    def device(self, device_id: str) -> Device | None:
        return next((d for d in self.devices if d.device_id == device_id), None)

    def controller(self, name: str) -> Controller | None:
        return next((c for c in self.controllers if c.name == name), None)

    def with_address(self, device_id: str, host: str, port: int) -> SiteConfig:
        """The config with one device's Modbus address replaced (`--modbus DEVICE=HOST:PORT`)."""
        if self.device(device_id) is None:
            known = ", ".join(d.device_id for d in self.devices) or "none"
            raise ConfigError(
                f"--modbus names device {device_id!r}, which config version {self.version!r} "
                f"does not have (devices: {known}); fix the device name"
            )
        devices = [
            msgspec.structs.replace(d, host=host, port=port) if d.device_id == device_id else d
            for d in self.devices
        ]
        return msgspec.structs.replace(self, devices=devices)


_decoder = msgspec.json.Decoder(SiteConfig)


def decode_config(raw: bytes) -> SiteConfig:
    """Decode and check a capability config; raises ConfigError naming the field at fault."""
    try:
        site = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"capability config is invalid: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"capability config is not JSON: {exc}") from None
    problem = _consistency_problem(site)
    if problem is not None:
        raise ConfigError(f"capability config version {site.version!r}: {problem}")
    return site


def encode_config(site: SiteConfig) -> bytes:
    return msgspec.json.encode(site)


def _names_problem(kind: str, names: list[str], reserved: str = "", owner: str = "") -> str | None:
    """Names of one `kind` must be distinct, and leave the `reserved` one to its `owner`."""
    if len(set(names)) != len(names):
        return f"{kind}s repeat: {names}"
    if reserved and reserved in names:
        return f"{kind} {reserved!r} is reserved for {owner}"
    return None


def _consistency_problem(site: SiteConfig) -> str | None:
    devices = [d.device_id for d in site.devices]
    problem = _names_problem("device id", devices, "core", "the Core Cycle's controllers")
    if problem is not None:
        return problem
    for device in site.devices:
        problem = _device_problem(device)
        if problem is not None:
            return f"device {device.device_id!r}: {problem}"
    controllers = [c.name for c in site.controllers]
    problem = _names_problem("controller name", controllers, "system", "system commands")
    if problem is not None:
        return problem
    for ctl in site.controllers:
        if ctl.default_mode not in ctl.modes:
            return f"controller {ctl.name!r}: default_mode {ctl.default_mode!r} not in {ctl.modes}"
    return None


def _device_problem(device: Device) -> str | None:
    problem = _names_problem("channel name", [c.name for c in device.channels])
    if problem is not None:
        return problem
    used: dict[tuple[str, int], str] = {}
    for ch in device.channels:
        if ch.min is not None and ch.max is not None and ch.min > ch.max:
            return f"channel {ch.name!r}: min {ch.min} is above max {ch.max}"
        if ch.access != "read" and ch.register == "input":
            return f"channel {ch.name!r}: input registers are read-only; use access 'read'"
        for offset in range(REGISTER_COUNT[ch.data_type]):
            key = (ch.register, ch.address + offset)
            if key in used:
                return f"channels {used[key]!r} and {ch.name!r} overlap at {key[0]} {key[1]}"
            used[key] = ch.name
    return None


def shipped_config(edge_id: str) -> bytes | None:
    """The packaged config JSON of a known site (`edge/sites/<edge_id>.json`), or None."""
    if "/" in edge_id or "\\" in edge_id or edge_id.startswith("."):
        return None
    entry = resources.files("edge").joinpath("sites", f"{edge_id}.json")
    try:
        return entry.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


class ConfigSource(StrEnum):
    FILE = "file"
    CACHE = "cache"
    CLOUD = "cloud"
    SHIPPED = "shipped"


def read_cached(state_dir: Path) -> bytes | None:
    path = state_dir / CONFIG_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def write_cached(state_dir: Path, raw: bytes) -> None:
    """Replace the cached config atomically (write, fsync, rename)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", dir=state_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, state_dir / CONFIG_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_edge(site: SiteConfig, edge_id: str, origin: str) -> SiteConfig:
    if site.edge_id != edge_id:
        raise ConfigError(
            f"the config from {origin} is for edge {site.edge_id!r}, not {edge_id!r}; "
            "point the agent at this edge's config"
        )
    return site


def config_url(gateway_url: str, edge_id: str) -> str:
    """`ws://H:P[/prefix]` -> `http://H:P[/prefix]/api/edges/{edge_id}/config`."""
    parts = urlsplit(gateway_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/") + f"/api/edges/{quote(edge_id)}/config"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def _fetch(url: str, token: str, timeout_s: float) -> bytes | None:
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body: bytes = response.read(MAX_CONFIG_BYTES + 1)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise ConfigError(f"GET {url} answered HTTP {exc.code}: {exc.reason}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise ConfigError(f"GET {url} failed: {exc}") from None
    if len(body) > MAX_CONFIG_BYTES:
        raise ConfigError(f"GET {url} sent more than {MAX_CONFIG_BYTES} bytes")
    return body


async def fetch_config(
    gateway_url: str, edge_id: str, token: str, timeout_s: float
) -> bytes | None:
    """The edge's config JSON from the cloud; None if it has none (404); ConfigError else."""
    url = config_url(gateway_url, edge_id)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"cannot derive an http(s) URL from --gateway {gateway_url!r}")
    return await asyncio.to_thread(_fetch, url, token, timeout_s)
