"""The inference endpoint record: frozen dataclasses and the one function that parses them.

Pure: no I/O. A raw DynamoDB item (Decimals, numeric strings, missing optional fields) becomes
either a valid :class:`Endpoint` or a list of precise errors that name the endpoint and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Mapping

DESIRED_STATES = ("deploying", "running", "stopped", "deleted")
REGION_STATES = (
    "pending", "creating", "running", "updating", "stopping",
    "stopped", "deleting", "deleted", "error",
)
ACCELERATORS = ("nvidia", "neuron")
CAPACITY_TYPES = ("spot", "on-demand")
METRIC_TYPES = ("cpu", "memory", "gpu")
DEFAULT_NAMESPACE = "gco-inference"
MAX_NAME_LEN = 50
MODELS_ROOT = "/models"
"""Where the shared model claim lives; an endpoint's own directory is ``/models/<name>``."""
CANARY_SUFFIX = "-canary"

DEFAULT_REQUESTS = {"cpu": "1", "memory": "4Gi"}
DEFAULT_LIMITS = {"cpu": "4", "memory": "16Gi"}

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_REGION = re.compile(r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$")
# An image reference: registry/repo[:tag][@digest]; no whitespace or shell metacharacters.
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?(@sha256:[a-f0-9]{64})?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_QUANTITY = re.compile(r"^\+?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][-+]?\d+)?$")
_RESOURCE_NAME = re.compile(r"^(cpu|memory|ephemeral-storage|hugepages-[0-9]+[KMG]i)$")
_HTTP_PATH = re.compile(r"^/[A-Za-z0-9._~/-]*$")
_FS_PATH = re.compile(r"^/[A-Za-z0-9._/-]*$")
_S3_URI = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/[A-Za-z0-9!_.*'()/=+-]*)?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_VLLM_TGI = re.compile(r"(^|[/_-])(vllm|text-generation-inference|tgi)([/:_-]|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

MAX_REPLICAS = 1000
MAX_GPUS = 16
MAX_STRING = 4096
MAX_ENV_VALUE = 32 * 1024
MAX_LIST = 128
MAX_MAP = 256
MAX_STATUS_NUMBER = 10**6

_QUANTITY_SUFFIX = {
    "": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}


@dataclass(frozen=True)
class Metric:
    type: str
    target: int


@dataclass(frozen=True)
class Autoscaling:
    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 10
    metrics: tuple[Metric, ...] = (Metric("cpu", 70),)


@dataclass(frozen=True)
class Canary:
    image: str
    weight: int
    replicas: int = 1


@dataclass(frozen=True)
class Resources:
    requests: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_REQUESTS))
    limits: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_LIMITS))


@dataclass(frozen=True)
class Spec:
    image: str
    region_image_uris: Mapping[str, str] = field(default_factory=dict)
    replicas: int = 1
    port: int = 8000
    gpu_count: int = 1
    accelerator: str = "nvidia"
    health_check_path: str = "/health"
    env: Mapping[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    model_path: str | None = None
    model_source: str | None = None
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    capacity_type: str | None = None
    autoscaling: Autoscaling = field(default_factory=Autoscaling)
    canary: Canary | None = None

    def image_for(self, region: str) -> str:
        return self.region_image_uris.get(region, self.image)

    @property
    def serves_root_path(self) -> bool:
        """Whether the primary image takes --root-path (see :func:`serves_root_path`)."""
        return serves_root_path(self.image)


@dataclass(frozen=True)
class RolloutPolicy:
    """How a change of ``spec`` reaches the endpoint's regions (record field ``rollout_policy``, or a
    stack's ``gco:rolloutPolicy``): wave by wave, each healthy for its bake time before the next."""

    waves: tuple[tuple[str, ...], ...]
    bake_seconds: tuple[int, ...]
    """One per wave: how long every region of the wave must stay healthy before the next wave."""
    unready_limit_seconds: int = 600
    """How long a region of the current wave may stay unhealthy on the new revision before the
    rollout fails and rolls back."""
    urgent: bool = False
    """Every change goes to every region at once (waves skipped) while this is set."""

    def bake_for(self, wave: int) -> int:
        return self.bake_seconds[min(wave, len(self.bake_seconds) - 1)] if self.bake_seconds else 0


DEFAULT_BAKE_SECONDS = 300
DEFAULT_UNREADY_LIMIT = 600
MAX_BAKE_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class RegionStatus:
    """One region's entry in ``region_status``; read leniently, other tools write it too."""

    state: str | None = None
    replicas_ready: int | None = None
    replicas_desired: int | None = None
    last_sync: str | None = None
    error: str | None = None
    ingress: str | None = None
    unready_since: str | None = None
    message: str | None = None
    revision: str | None = None
    """The revision the region's Deployment runs (health job; endpoints rolled out under a policy)."""
    canary_ready: int | None = None
    canary_desired: int | None = None

    @property
    def ingress_withdrawn(self) -> bool:
        return self.ingress == "withdrawn"


@dataclass(frozen=True)
class Endpoint:
    name: str
    desired_state: str
    target_regions: tuple[str, ...]
    namespace: str
    spec: Spec
    ingress_path: str
    created_at: str | None = None
    updated_at: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    created_by: str | None = None
    region_status: Mapping[str, RegionStatus] = field(default_factory=dict)
    rollout_policy: RolloutPolicy | None = None
    """The record's own policy; a stack's default applies when None (see rollout.policy_for)."""
    revision: str | None = None
    """Set by rollout.region_view on endpoints rolled out under a policy: the revision (spec digest)
    declared in this region, written on the Deployment for the health job to report."""

    def targets(self, region: str) -> bool:
        return region in self.target_regions

    def status_in(self, region: str) -> RegionStatus:
        return self.region_status.get(region, RegionStatus())


def serves_root_path(image: str) -> bool:
    """vLLM and TGI images take --root-path so they answer under the ingress prefix."""
    return bool(_VLLM_TGI.search(image_repository(image).lower()))


def image_repository(image: str) -> str:
    """``registry:5000/org/vllm-openai:v1@sha256:..`` -> ``registry:5000/org/vllm-openai``."""
    ref = image.split("@", 1)[0]
    head, _, last = ref.rpartition("/")
    return (head + "/" if head else "") + last.split(":", 1)[0]


class _Errors:
    """Collects errors for one record, each prefixed with the endpoint and the field."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f'endpoint "{self.name}": {path} {message}')


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(errs: _Errors, path: str, value: Any, default: int | None, lo: int, hi: int) -> int | None:
    if value is None:
        if default is None:
            errs.add(path, "is required")
        return default
    if isinstance(value, bool):
        errs.add(path, f"must be an integer, got {_show(value)}")
        return default
    number: Decimal
    try:
        if isinstance(value, (int, Decimal)):
            number = Decimal(value)
        elif isinstance(value, float):
            number = Decimal(repr(value)) if math.isfinite(value) else Decimal("NaN")
        elif isinstance(value, str) and len(value) <= 32:
            number = Decimal(value.strip())
        else:
            raise InvalidOperation
    except (InvalidOperation, ValueError):
        errs.add(path, f"must be an integer, got {_show(value)}")
        return default
    if not number.is_finite() or number != number.to_integral_value():
        errs.add(path, f"must be an integer, got {_show(value)}")
        return default
    result = int(number)
    if result < lo:
        errs.add(path, f"must be >= {lo}, got {result}")
        return default
    if result > hi:
        errs.add(path, f"must be <= {hi}, got {result}")
        return default
    return result


def _str(errs: _Errors, path: str, value: Any, *, required: bool = False, limit: int = MAX_STRING,
         pattern: re.Pattern[str] | None = None, hint: str = "") -> str | None:
    if value is None or value == "":
        if required:
            errs.add(path, "is required")
        return None
    if not isinstance(value, str):
        errs.add(path, f"must be a string, got {type(value).__name__}")
        return None
    if len(value) > limit:
        errs.add(path, f"must be at most {limit} characters, got {len(value)}")
        return None
    if _CONTROL.search(value):
        errs.add(path, "must not contain control characters")
        return None
    if pattern is not None and not pattern.match(value):
        errs.add(path, f"{hint or 'is malformed'}, got {_show(value)}")
        return None
    return value


def _map(errs: _Errors, path: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        errs.add(path, f"must be a map, got {type(value).__name__}")
        return {}
    if len(value) > MAX_MAP:
        errs.add(path, f"must have at most {MAX_MAP} entries, got {len(value)}")
        return {}
    return value


def _list(errs: _Errors, path: str, value: Any) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, (set, frozenset)):  # DynamoDB string sets
        value = sorted(value)
    if not isinstance(value, (list, tuple)):
        errs.add(path, f"must be a list, got {type(value).__name__}")
        return None
    if len(value) > MAX_LIST:
        errs.add(path, f"must have at most {MAX_LIST} items, got {len(value)}")
        return None
    return list(value)


def _enum(errs: _Errors, path: str, value: Any, allowed: Iterable[str], default: str | None) -> str | None:
    if value is None or value == "":
        if default is None and path in ("desired_state",):
            errs.add(path, "is required")
        return default
    allowed = tuple(allowed)
    if value not in allowed:
        errs.add(path, f"must be one of {', '.join(allowed)}, got {_show(value)}")
        return default
    return value


def _bool(errs: _Errors, path: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    errs.add(path, f"must be true or false, got {_show(value)}")
    return default


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes quantity as a number (``"500m"`` -> 0.5, ``"4Gi"`` -> 4294967296)."""
    m = _QUANTITY.match(text)
    if not m:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    suffix = m.group(3) or ""
    if suffix[:1] in ("e", "E"):
        return Decimal(m.group(1) + suffix)
    return Decimal(m.group(1)) * _QUANTITY_SUFFIX[suffix]


def _quantities(errs: _Errors, path: str, value: Any, defaults: Mapping[str, str]) -> dict[str, str]:
    result = dict(defaults)
    for key, qty in _map(errs, path, value).items():
        if not isinstance(key, str) or not _RESOURCE_NAME.match(key):
            hint = " (GPUs come from spec.gpu_count)" if isinstance(key, str) and ("gpu" in key or "neuron" in key) else ""
            errs.add(f"{path}.{key}", f"is not a supported resource name{hint}")
            continue
        if isinstance(qty, (int, Decimal)) and not isinstance(qty, bool):
            qty = str(qty)
        text = _str(errs, f"{path}.{key}", qty, required=True, limit=32, pattern=_QUANTITY,
                    hint="must be a Kubernetes quantity such as 500m, 2 or 16Gi")
        if text is not None:
            result[key] = text
    return result


def _resources(errs: _Errors, value: Any) -> Resources:
    raw = _map(errs, "spec.resources", value)
    requests = _quantities(errs, "spec.resources.requests", raw.get("requests"), DEFAULT_REQUESTS)
    limits = _quantities(errs, "spec.resources.limits", raw.get("limits"), DEFAULT_LIMITS)
    for key in sorted(set(requests) & set(limits)):
        try:
            if parse_quantity(requests[key]) > parse_quantity(limits[key]):
                errs.add(f"spec.resources.requests.{key}",
                         f"must not exceed limits.{key} ({limits[key]}), got {requests[key]}")
        except ValueError:
            pass  # already reported
    return Resources(requests=requests, limits=limits)


def _string_list(errs: _Errors, path: str, value: Any) -> tuple[str, ...] | None:
    if isinstance(value, str):
        errs.add(path, "must be a list of strings (an argument vector), not a single string")
        return None
    items = _list(errs, path, value)
    if items is None:
        return None
    out = []
    for i, item in enumerate(items):
        if isinstance(item, (int, Decimal)) and not isinstance(item, bool):
            item = str(item)
        text = _str(errs, f"{path}[{i}]", item, required=True)
        if text is not None:
            out.append(text)
    return tuple(out)


def _env(errs: _Errors, value: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, val in _map(errs, "spec.env", value).items():
        if not isinstance(key, str) or not _ENV_NAME.match(key) or len(key) > 256:
            errs.add("spec.env", f"has an invalid variable name {_show(key)} (letters, digits, _; not starting with a digit)")
            continue
        if isinstance(val, bool):
            val = "true" if val else "false"
        elif isinstance(val, (int, Decimal)):
            val = str(val)
        if val is None:
            val = ""
        if not isinstance(val, str):
            errs.add(f"spec.env.{key}", f"must be a string, got {type(val).__name__}")
            continue
        if len(val) > MAX_ENV_VALUE:
            errs.add(f"spec.env.{key}", f"must be at most {MAX_ENV_VALUE} characters, got {len(val)}")
            continue
        if "\x00" in val:
            errs.add(f"spec.env.{key}", "must not contain NUL characters")
            continue
        out[key] = val
    return out


def _label_map(errs: _Errors, path: str, value: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, val in _map(errs, path, value).items():
        if not isinstance(key, str) or not _label_key_ok(key):
            errs.add(path, f"has an invalid label key {_show(key)}")
            continue
        if isinstance(val, bool):
            val = "true" if val else "false"
        elif isinstance(val, (int, Decimal)):
            val = str(val)
        if not isinstance(val, str) or len(val) > 63 or not _LABEL_VALUE.match(val):
            errs.add(f"{path}.{key}", f"is not a valid label value, got {_show(val)}")
            continue
        out[key] = val
    return out


def _label_key_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _LABEL_PREFIX.match(prefix)):
        return False
    return len(name) <= 63 and bool(_LABEL_NAME.match(name))


def _autoscaling(errs: _Errors, value: Any) -> Autoscaling:
    raw = _map(errs, "spec.autoscaling", value)
    enabled = _bool(errs, "spec.autoscaling.enabled", raw.get("enabled"), False)
    lo = _int(errs, "spec.autoscaling.min_replicas", raw.get("min_replicas"), 1, 1, MAX_REPLICAS)
    hi = _int(errs, "spec.autoscaling.max_replicas", raw.get("max_replicas"), 10, 1, MAX_REPLICAS)
    if lo is not None and hi is not None and lo > hi:
        errs.add("spec.autoscaling.min_replicas", f"must be <= max_replicas ({hi}), got {lo}")
    metrics: list[Metric] = []
    raw_metrics = _list(errs, "spec.autoscaling.metrics", raw.get("metrics"))
    for i, m in enumerate(raw_metrics or []):
        path = f"spec.autoscaling.metrics[{i}]"
        if not isinstance(m, Mapping):
            errs.add(path, f"must be a map, got {type(m).__name__}")
            continue
        kind = _enum(errs, f"{path}.type", m.get("type"), METRIC_TYPES, None)
        if kind is None and m.get("type") in (None, ""):
            errs.add(f"{path}.type", "is required")
        target = _int(errs, f"{path}.target", m.get("target"), 70, 1, 100)
        if kind is not None and target is not None:
            metrics.append(Metric(kind, target))
    if len({m.type for m in metrics}) != len(metrics):
        errs.add("spec.autoscaling.metrics", "must not list the same metric type twice")
    return Autoscaling(enabled=enabled, min_replicas=lo or 1, max_replicas=hi or 10,
                       metrics=tuple(metrics) if raw_metrics else Autoscaling().metrics)


def _canary(errs: _Errors, value: Any) -> Canary | None:
    if value is None:
        return None
    raw = _map(errs, "spec.canary", value)
    if not raw:
        return None
    image = _str(errs, "spec.canary.image", raw.get("image"), required=True, limit=512,
                 pattern=_IMAGE, hint="must be a container image reference")
    weight = _int(errs, "spec.canary.weight", raw.get("weight"), None, 1, 99)
    replicas = _int(errs, "spec.canary.replicas", raw.get("replicas"), 1, 0, MAX_REPLICAS)
    if image is None or weight is None or replicas is None:
        return None
    return Canary(image=image, weight=weight, replicas=replicas)


_STATUS_TEXT = ("last_sync", "error", "ingress", "unready_since", "message", "revision")
_STATUS_NUMBERS = ("replicas_ready", "replicas_desired", "canary_ready", "canary_desired")


def status_number(value: Any) -> int | None:
    """A whole number in 0..MAX_STATUS_NUMBER, or None; never builds a huge int from a Decimal."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_STATUS_NUMBER else None
    try:
        if isinstance(value, Decimal):
            number = value
        elif isinstance(value, float):
            number = Decimal(repr(value)) if math.isfinite(value) else Decimal("NaN")
        elif isinstance(value, str) and len(value) <= 32:
            number = Decimal(value.strip())
        else:
            return None
    except (InvalidOperation, ValueError):
        return None
    if not number.is_finite() or not 0 <= number <= MAX_STATUS_NUMBER or number != number.to_integral_value():
        return None
    return int(number)


def _read_region_status(value: Any, errs: _Errors) -> dict[str, RegionStatus]:
    """``region_status`` as far as it is readable; what is not is reported to ``errs`` and read as None.

    Other tools write this attribute, so nothing in it ever fails the record: an entry that is not a
    map is skipped, a field of the wrong type, an unknown state or a string over MAX_STRING is None.
    """
    out: dict[str, RegionStatus] = {}
    if value is None:
        return out
    if not isinstance(value, Mapping):
        errs.add("region_status", f"must be a map, got {type(value).__name__}")
        return out
    for region, raw in value.items():
        if not isinstance(region, str) or not _REGION.match(region):
            errs.add("region_status", f"has an invalid region key {_show(region)}")
            continue
        path = f"region_status.{region}"
        if not isinstance(raw, Mapping):
            errs.add(path, f"must be a map, got {type(raw).__name__}")
            continue
        fields: dict[str, Any] = {}
        for key in _STATUS_TEXT + ("state",):
            v = raw.get(key)
            if v is None:
                continue
            if not isinstance(v, str):
                errs.add(f"{path}.{key}", f"must be a string, got {type(v).__name__}")
            elif len(v) > MAX_STRING:
                errs.add(f"{path}.{key}", f"must be at most {MAX_STRING} characters, got {len(v)}")
            elif key == "state" and v not in REGION_STATES:
                errs.add(f"{path}.state", f"must be one of {', '.join(REGION_STATES)}, got {_show(v)}")
            else:
                fields[key] = v
        for key in _STATUS_NUMBERS:
            v = raw.get(key)
            if v is None:
                continue
            number = status_number(v)
            if number is None:
                errs.add(f"{path}.{key}", f"must be a whole number from 0 to {MAX_STATUS_NUMBER}, got {_show(v)}")
            else:
                fields[key] = number
        out[region] = RegionStatus(**fields)
    return out


def stored_region_status(item: Any, region: str) -> dict[str, Any] | None:
    """The raw ``region_status.<region>`` map as stored (the ``expected`` of a conditional write).

    None when the item, its ``region_status`` or the region's entry is not a map (or is absent).
    A shallow copy: the caller may build the next status from it without touching the item.
    """
    if not isinstance(item, Mapping):
        return None
    statuses = item.get("region_status")
    if not isinstance(statuses, Mapping):
        return None
    raw = statuses.get(region)
    return dict(raw) if isinstance(raw, Mapping) else None


def region_status_problem(item: Any, *, limit: int = 5) -> str | None:
    """What is malformed in an item's ``region_status``, for a status message; None when nothing is.

    The record itself stays valid (parse_endpoint reads such values as None); this only says why.
    """
    if not isinstance(item, Mapping):
        return None
    errs = _Errors(record_name(item)[:80])
    _read_region_status(item.get("region_status"), errs)
    if not errs.items:
        return None
    shown = errs.items[:limit]
    more = len(errs.items) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more else "")


@dataclass(frozen=True)
class ParseResult:
    name: str
    endpoint: Endpoint | None
    errors: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.endpoint is not None and not self.errors


def record_name(item: Mapping[str, Any]) -> str:
    """The endpoint name for error messages, even when the record is malformed."""
    raw = item.get("endpoint_name") if isinstance(item, Mapping) else None
    return raw if isinstance(raw, str) and raw else "<unnamed>"


def parse_endpoint(item: Mapping[str, Any], *, allowed_namespaces: Iterable[str] = (DEFAULT_NAMESPACE,)) -> ParseResult:
    """Turn one raw table item into a valid Endpoint or precise errors; never raises on bad data."""
    name = record_name(item)
    errs = _Errors(name[:80])
    if not isinstance(item, Mapping):
        errs.add("record", f"must be a map, got {type(item).__name__}")
        return ParseResult(name, None, tuple(errs.items))

    raw_name = item.get("endpoint_name")
    if not isinstance(raw_name, str) or not raw_name:
        errs.add("endpoint_name", "is required")
    elif len(raw_name) > MAX_NAME_LEN:
        errs.add("endpoint_name", f"must be at most {MAX_NAME_LEN} characters, got {len(raw_name)}")
    elif not _DNS1035.match(raw_name):
        errs.add("endpoint_name", f"must be a DNS-1035 label (lowercase letters, digits, '-', starting with a letter), got {_show(raw_name)}")

    desired = _enum(errs, "desired_state", item.get("desired_state"), DESIRED_STATES, None)

    regions: list[str] = []
    raw_regions = item.get("target_regions")
    if raw_regions is None:
        errs.add("target_regions", "is required")
    for i, region in enumerate(_list(errs, "target_regions", raw_regions) or []):
        r = _str(errs, f"target_regions[{i}]", region, required=True, limit=32, pattern=_REGION,
                 hint="must be a region name")
        if r is not None and r not in regions:
            regions.append(r)

    allowed = tuple(allowed_namespaces)
    namespace = _str(errs, "namespace", item.get("namespace"), limit=63, pattern=_DNS1123_LABEL,
                     hint="must be a DNS-1123 label") or DEFAULT_NAMESPACE
    if namespace not in allowed:
        errs.add("namespace", f"must be one of the stack's allowed namespaces ({', '.join(allowed)}), got {_show(namespace)}")

    default_path = f"/inference/{raw_name}" if isinstance(raw_name, str) else "/inference/"
    ingress_path = _str(errs, "ingress_path", item.get("ingress_path"), limit=256, pattern=_HTTP_PATH,
                        hint="must be an absolute URL path") or default_path
    if isinstance(raw_name, str) and ingress_path != default_path:
        if not ingress_path.startswith(default_path + "/") or ingress_path.endswith("/") \
                or any(seg in ("", ".", "..") for seg in ingress_path.split("/")[1:]):
            errs.add("ingress_path", f"must be {default_path} or a clean path below it, got {_show(ingress_path)}")

    spec_raw = item.get("spec")
    if spec_raw is None:
        errs.add("spec", "is required")
        spec_raw = {}
    elif not isinstance(spec_raw, Mapping):
        errs.add("spec", f"must be a map, got {type(spec_raw).__name__}")
        spec_raw = {}
    spec = _spec(errs, spec_raw, raw_name if isinstance(raw_name, str) else "")
    policy = parse_rollout_policy(errs, "rollout_policy", item.get("rollout_policy"))

    if errs.items or spec is None or desired is None:
        return ParseResult(name, None, tuple(errs.items))
    endpoint = Endpoint(
        name=raw_name, desired_state=desired, target_regions=tuple(regions), namespace=namespace,
        spec=spec, ingress_path=ingress_path,
        created_at=item.get("created_at") if isinstance(item.get("created_at"), str) else None,
        updated_at=item.get("updated_at") if isinstance(item.get("updated_at"), str) else None,
        labels={k: str(v) for k, v in item["labels"].items()} if isinstance(item.get("labels"), Mapping) else {},
        created_by=item.get("created_by") if isinstance(item.get("created_by"), str) else None,
        region_status=_read_region_status(item.get("region_status"), _Errors(name)),
        rollout_policy=policy,
    )
    return ParseResult(name, endpoint, ())


MAX_WAVES = 16


def parse_rollout_policy(errs: _Errors, path: str, value: Any) -> RolloutPolicy | None:
    """A rollout policy map, or None when absent; errors name the field (``rollout_policy.waves[1][0]``)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        errs.add(path, f"must be a map, got {type(value).__name__}")
        return None
    known = {"waves", "bake_seconds", "unready_limit_seconds", "urgent"}
    for key in value:
        if key not in known:
            errs.add(f"{path}.{key}", f"is not a rollout policy field ({', '.join(sorted(known))})")
    before = len(errs.items)
    waves: list[tuple[str, ...]] = []
    seen: set[str] = set()
    raw_waves = _list(errs, f"{path}.waves", value.get("waves"))
    if not raw_waves:
        if raw_waves is not None or value.get("waves") is None:
            errs.add(f"{path}.waves", "must list at least one wave of regions")
        raw_waves = []
    if len(raw_waves) > MAX_WAVES:
        errs.add(f"{path}.waves", f"must have at most {MAX_WAVES} waves, got {len(raw_waves)}")
        raw_waves = []
    for i, wave in enumerate(raw_waves):
        regions = _list(errs, f"{path}.waves[{i}]", wave)
        if not regions:
            if regions is not None:
                errs.add(f"{path}.waves[{i}]", "must name at least one region")
            continue
        names = []
        for j, region in enumerate(regions):
            r = _str(errs, f"{path}.waves[{i}][{j}]", region, required=True, limit=32, pattern=_REGION,
                     hint="must be a region name")
            if r is None:
                continue
            if r in seen:
                errs.add(f"{path}.waves[{i}][{j}]", f"names {r} a second time (a region belongs to one wave)")
                continue
            seen.add(r)
            names.append(r)
        waves.append(tuple(names))
    raw_bake = value.get("bake_seconds")
    if isinstance(raw_bake, (list, tuple)):
        if len(raw_bake) != len(raw_waves):
            errs.add(f"{path}.bake_seconds", f"must be one number or one per wave ({len(raw_waves)}), got {len(raw_bake)}")
        bake = tuple(b for i, v in enumerate(raw_bake[:MAX_WAVES])
                     if (b := _int(errs, f"{path}.bake_seconds[{i}]", v, DEFAULT_BAKE_SECONDS, 0, MAX_BAKE_SECONDS)) is not None)
    else:
        one = _int(errs, f"{path}.bake_seconds", raw_bake, DEFAULT_BAKE_SECONDS, 0, MAX_BAKE_SECONDS)
        bake = (one if one is not None else DEFAULT_BAKE_SECONDS,) * max(1, len(waves))
    limit = _int(errs, f"{path}.unready_limit_seconds", value.get("unready_limit_seconds"), DEFAULT_UNREADY_LIMIT,
                 1, MAX_BAKE_SECONDS)
    urgent = _bool(errs, f"{path}.urgent", value.get("urgent"), False)
    if len(errs.items) > before:
        return None
    return RolloutPolicy(waves=tuple(waves), bake_seconds=bake, unready_limit_seconds=limit or DEFAULT_UNREADY_LIMIT,
                         urgent=urgent)


def config_rollout_policy(value: Any, key: str = "gco:rolloutPolicy") -> tuple[RolloutPolicy | None, list[str]]:
    """A stack's default rollout policy from config (a map, or its JSON text), and what is wrong with it."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            return None, [f"{key} must be a map (JSON), got unreadable text: {exc}"]
    errs = _Errors("")
    policy = parse_rollout_policy(errs, key, value)
    return policy, [e.split(": ", 1)[1] for e in errs.items]


def rollout_policy_to_item(policy: RolloutPolicy) -> dict[str, Any]:
    return {"waves": [list(w) for w in policy.waves], "bake_seconds": list(policy.bake_seconds),
            "unready_limit_seconds": policy.unready_limit_seconds, "urgent": policy.urgent}


def _spec(errs: _Errors, raw: Mapping[str, Any], name: str) -> Spec | None:
    image = _str(errs, "spec.image", raw.get("image"), required=True, limit=512, pattern=_IMAGE,
                 hint="must be a container image reference")
    region_images: dict[str, str] = {}
    for region, uri in _map(errs, "spec.region_image_uris", raw.get("region_image_uris")).items():
        if not isinstance(region, str) or not _REGION.match(region):
            errs.add("spec.region_image_uris", f"has an invalid region {_show(region)}")
            continue
        img = _str(errs, f"spec.region_image_uris.{region}", uri, required=True, limit=512, pattern=_IMAGE,
                   hint="must be a container image reference")
        if img is not None:
            region_images[region] = img
    replicas = _int(errs, "spec.replicas", raw.get("replicas"), 1, 0, MAX_REPLICAS)
    port = _int(errs, "spec.port", raw.get("port"), 8000, 1, 65535)
    gpu_count = _int(errs, "spec.gpu_count", raw.get("gpu_count"), 1, 0, MAX_GPUS)
    accelerator = _enum(errs, "spec.accelerator", raw.get("accelerator"), ACCELERATORS, "nvidia")
    health = _str(errs, "spec.health_check_path", raw.get("health_check_path"), limit=256,
                  pattern=_HTTP_PATH, hint="must be an absolute URL path") or "/health"
    env = _env(errs, raw.get("env"))
    resources = _resources(errs, raw.get("resources"))
    model_path = _str(errs, "spec.model_path", raw.get("model_path"), limit=256, pattern=_FS_PATH,
                      hint="must be an absolute path of letters, digits, '.', '_', '-', '/'")
    if model_path is not None and (".." in model_path.split("/") or model_path == "/"):
        errs.add("spec.model_path", f"must not be / or contain '..', got {_show(model_path)}")
        model_path = None
    model_source = _str(errs, "spec.model_source", raw.get("model_source"), limit=1024, pattern=_S3_URI,
                        hint="must be an s3://bucket/prefix URI (letters, digits and !_.*'()/=+- only)")
    if model_source is not None and model_path is None and raw.get("model_path") in (None, ""):
        # the endpoint's own directory on the shared claim, never the claim's root
        model_path = f"{MODELS_ROOT}/{name}"
    command = _string_list(errs, "spec.command", raw.get("command"))
    args = _string_list(errs, "spec.args", raw.get("args"))
    node_selector = _label_map(errs, "spec.node_selector", raw.get("node_selector"))
    capacity_type = _enum(errs, "spec.capacity_type", raw.get("capacity_type"), CAPACITY_TYPES, None)
    autoscaling = _autoscaling(errs, raw.get("autoscaling"))
    canary = _canary(errs, raw.get("canary"))
    if image is None or replicas is None or port is None or gpu_count is None:
        return None
    return Spec(
        image=image, region_image_uris=region_images, replicas=replicas, port=port,
        gpu_count=gpu_count, accelerator=accelerator or "nvidia", health_check_path=health, env=env,
        resources=resources, model_path=model_path, model_source=model_source,
        command=command or None, args=args or None, node_selector=node_selector,
        capacity_type=capacity_type, autoscaling=autoscaling, canary=canary,
    )


@dataclass(frozen=True)
class Validated:
    """The table, parsed: valid endpoints by name and errors for each invalid record."""

    endpoints: Mapping[str, Endpoint]
    invalid: Mapping[str, tuple[str, ...]]


def validate_all(items: Iterable[Mapping[str, Any]], *, allowed_namespaces: Iterable[str] = (DEFAULT_NAMESPACE,)) -> Validated:
    """Parse every item and check what spans records: names and ingress paths are unique."""
    allowed = tuple(allowed_namespaces)
    valid: dict[str, Endpoint] = {}
    invalid: dict[str, list[str]] = {}
    for item in items:
        result = parse_endpoint(item, allowed_namespaces=allowed)
        if result.name in valid or result.name in invalid:
            invalid.setdefault(result.name, []).append(f'endpoint "{result.name}": endpoint_name appears more than once in the table')
            valid.pop(result.name, None)
            continue
        if result.ok:
            valid[result.name] = result.endpoint  # type: ignore[assignment]
        else:
            invalid[result.name] = list(result.errors)
    claims: dict[str, list[str]] = {}
    for ep in valid.values():
        if ep.desired_state != "deleted":
            claims.setdefault(ep.ingress_path, []).append(ep.name)
    for path, names in claims.items():
        if len(names) > 1:
            for n in names:
                others = ", ".join(o for o in names if o != n)
                invalid[n] = [f'endpoint "{n}": ingress_path {path} is also claimed by {others}']
                valid.pop(n, None)
    for name, error in canary_name_collisions(valid).items():
        invalid[name] = [error]
        valid.pop(name, None)
    return Validated(endpoints=valid, invalid={k: tuple(v) for k, v in invalid.items()})


def canary_name_collisions(endpoints: Mapping[str, Endpoint]) -> dict[str, str]:
    """Endpoints named ``<x>-canary`` whose objects would be those of endpoint x's canary.

    Such names are allowed (the platform writes them) until an endpoint x declares a canary: its
    Deployment and Service ``x-canary`` and Ingress ``inference-x-canary`` then have the same names.
    Both endpoints are reported, as two claims of one ingress path are: whichever came first keeps
    its last applied declaration and nothing that runs changes hands. One that is ``deleted``
    declares nothing, and must stay valid so that what it had is removed.
    """
    out: dict[str, str] = {}
    for name, ep in endpoints.items():
        base = name[:-len(CANARY_SUFFIX)] if name.endswith(CANARY_SUFFIX) else ""
        owner = endpoints.get(base)
        if ep.desired_state == "deleted" or owner is None or owner.desired_state == "deleted" \
                or owner.spec.canary is None:
            continue
        objects = f"Deployment and Service {name}, Ingress inference-{name}"
        out[name] = f'endpoint "{name}": endpoint_name collides with the canary of endpoint "{base}" ({objects})'
        out[base] = f'endpoint "{base}": spec.canary collides with endpoint "{name}" ({objects})'
    return out


def endpoint_to_item(ep: Endpoint) -> dict[str, Any]:
    """The table item for a valid endpoint (the platform's shape); parse_endpoint reads it back."""
    spec = ep.spec
    raw_spec: dict[str, Any] = {
        "image": spec.image, "replicas": spec.replicas, "port": spec.port, "gpu_count": spec.gpu_count,
        "accelerator": spec.accelerator, "health_check_path": spec.health_check_path,
        "resources": {"requests": dict(spec.resources.requests), "limits": dict(spec.resources.limits)},
    }
    optional = {
        "region_image_uris": dict(spec.region_image_uris), "env": dict(spec.env),
        "model_path": spec.model_path, "model_source": spec.model_source,
        "command": list(spec.command) if spec.command else None,
        "args": list(spec.args) if spec.args else None,
        "node_selector": dict(spec.node_selector), "capacity_type": spec.capacity_type,
    }
    raw_spec.update({k: v for k, v in optional.items() if v})
    a = spec.autoscaling
    if a != Autoscaling():
        raw_spec["autoscaling"] = {
            "enabled": a.enabled, "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "metrics": [{"type": m.type, "target": m.target} for m in a.metrics],
        }
    if spec.canary:
        raw_spec["canary"] = {"image": spec.canary.image, "weight": spec.canary.weight,
                              "replicas": spec.canary.replicas}
    item: dict[str, Any] = {
        "endpoint_name": ep.name, "desired_state": ep.desired_state,
        "target_regions": list(ep.target_regions), "namespace": ep.namespace,
        "ingress_path": ep.ingress_path, "spec": raw_spec,
    }
    for key in ("created_at", "updated_at", "created_by"):
        if getattr(ep, key):
            item[key] = getattr(ep, key)
    if ep.labels:
        item["labels"] = dict(ep.labels)
    if ep.rollout_policy is not None:
        item["rollout_policy"] = rollout_policy_to_item(ep.rollout_policy)
    return item


def spec_revision(ep: Endpoint) -> str:
    """The revision of an endpoint's spec: a digest of the spec as validated (so ``"2"`` and 2, or a
    default written out, are one revision)."""
    spec = endpoint_to_item(replace(ep, rollout_policy=None))["spec"]
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def region_statuses(value: Any) -> dict[str, RegionStatus]:
    """Every region's status of an item's raw ``region_status``, read leniently (never raises)."""
    return _read_region_status(value, _Errors("<unnamed>"))


# ---- a stored region status entry, as both writers (runner, health job) need it ----------------------------

STATUS_NUMBERS = ("replicas_ready", "replicas_desired", "canary_ready", "canary_desired")
STATUS_TEXTS = ("last_sync", "error", "message", "revision")
INGRESS_FLAGS = ("active", "withdrawn")
MAX_STATUS_TEXT = 4096
MAX_STATUS_SIZE = 16 * 1024


def _status_size(value: Any, budget: int) -> int:
    """Roughly how many characters a status value holds; stops counting past ``budget``."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        total = 0
        for k, v in value.items():
            total += len(str(k)) + _status_size(v, budget - total)
            if total > budget:
                break
        return total
    if isinstance(value, (list, tuple, set, frozenset)):
        total = 0
        for v in value:
            total += _status_size(v, budget - total)
            if total > budget:
                break
        return total
    return 8


def status_entry_problem(entry: Any) -> str | None:
    """Why a stored ``region_status.<region>`` cannot be read and written back safely (None: it can)."""
    if not isinstance(entry, Mapping):
        return f"must be a map, got {_show_kind(entry)}"
    if any(not isinstance(k, str) for k in entry):
        return "has a key that is not a string"
    size = _status_size(entry, MAX_STATUS_SIZE)
    if size > MAX_STATUS_SIZE:
        return f"holds more than {MAX_STATUS_SIZE} characters"
    for key, value in entry.items():
        if isinstance(value, str) and len(value) > MAX_STATUS_TEXT:
            return f".{key} must be at most {MAX_STATUS_TEXT} characters, got {len(value)}"
    state = entry.get("state")
    if state is not None and state not in REGION_STATES:
        return f".state must be one of {', '.join(REGION_STATES)}, got {_show_kind(state)}"
    ingress = entry.get("ingress")
    if ingress is not None and ingress not in INGRESS_FLAGS:
        return f".ingress must be active or withdrawn, got {_show_kind(ingress)}"
    since = entry.get("unready_since")
    if since is not None and not _iso_time(since):
        return f".unready_since must be an ISO-8601 time, got {_show_kind(since)}"
    for key in STATUS_NUMBERS:
        if entry.get(key) is not None and status_number(entry[key]) is None:
            return f".{key} must be a count of replicas, got {_show_kind(entry[key])}"
    for key in STATUS_TEXTS:
        if entry.get(key) is not None and not isinstance(entry[key], str):
            return f".{key} must be a string, got {_show_kind(entry[key])}"
    return None




def _iso_time(text: Any) -> bool:
    if not isinstance(text, str) or not text or len(text) > 64:
        return False
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
        return True
    except (ValueError, OverflowError):
        return False


def _show_kind(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else type(value).__name__ if isinstance(value, (Mapping, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
