"""The price table: what a request costs, per model and tier, and what the prefix cache saved.

Prices are per 1M tokens in the table's ``currency``, with at most 6 decimal places, so
each resolves to an integer number of micro-units per 1M tokens, i.e. pico-units
(1e-12 of the currency) per token. A request's cost is then an exact integer::

    cost_pico    = (prompt - cached) * prompt_micro + cached * cached_micro + completion * completion_micro
    savings_pico = cached * (prompt_micro - cached_micro)

(``prompt`` counts every prompt token, ``cached`` those the engine served from its prefix
cache.) Sums stay integers (Python ints, no overflow) and become a ``Decimal`` only for
display: no float is ever accumulated.

Each model (``"*"``: every model not listed) has an explicit ``default`` tier price;
``priority``, ``flex`` and ``batch`` are explicit too or derived from ``default`` by
``tier_multipliers`` (rounded half-even to 6 decimal places). The resolved table must
price cached prompt tokens at most the uncached price, flex and batch at most default,
and priority at least default; a table that does not is rejected with the offending entry.

The controller publishes the table as JSON at ``P/config/prices`` (see ``PRICES_KEY``)
when it starts; routers read it for their Prometheus cost counters.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

TierName = Literal["priority", "default", "flex", "batch"]
TIERS: tuple[TierName, ...] = ("priority", "default", "flex", "batch")
# kvfleet.v1.Tier values (common.proto); AUTO (0) is served, and billed, as default.
TIER_BY_VALUE: dict[int, TierName] = {0: "default", 1: "priority", 2: "default", 3: "flex", 4: "batch"}
TIER_VALUE: dict[TierName, int] = {"priority": 1, "default": 2, "flex": 3, "batch": 4}

PRICES_KEY = "config/prices"   # under the registry prefix: P/config/prices
MICRO = Decimal(1_000_000)
PICO = 10**12                  # pico-units per currency unit
ANY_MODEL = "*"
DEFAULT_MULTIPLIERS = {"priority": Decimal("1.5"), "flex": Decimal("0.5"), "batch": Decimal("0.5")}


class PricesError(ValueError):
    """A price table that cannot be used; the message names the entry."""


def _micro(value: Decimal, where: str) -> int:
    scaled = value * MICRO
    if scaled != scaled.to_integral_value():
        raise PricesError(f"{where}: {value} has more than 6 decimal places")
    return int(scaled)


class Price(BaseModel):
    """Prices per 1M tokens, in the table's currency."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Decimal = Field(ge=0, description="per 1M prompt tokens computed by the engine (not served from cache)")
    cached_prompt: Decimal = Field(ge=0, description="per 1M prompt tokens served from the prefix cache")
    completion: Decimal = Field(ge=0, description="per 1M completion tokens")

    @field_validator("prompt", "cached_prompt", "completion", mode="before")
    @classmethod
    def _exact(cls, v):
        # A float from JSON or TOML goes through its shortest repr, never its binary value.
        return Decimal(repr(v)) if isinstance(v, float) else v


class ModelPrices(BaseModel):
    """One model's prices; a tier left out is ``default`` times its tier multiplier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Price = Field(description="the default tier's prices")
    priority: Price | None = Field(None, description="explicit priority prices; else default x tier_multipliers.priority")
    flex: Price | None = Field(None, description="explicit flex prices; else default x tier_multipliers.flex")
    batch: Price | None = Field(None, description="explicit batch prices; else default x tier_multipliers.batch")


@dataclass(frozen=True, slots=True)
class MicroPrice:
    """Resolved prices in integer micro-units per 1M tokens (= pico-units per token)."""

    prompt: int
    cached_prompt: int
    completion: int

    def cost_pico(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        """Exact cost of one request (or of token sums at this price), pico-units."""
        return ((prompt_tokens - cached_tokens) * self.prompt + cached_tokens * self.cached_prompt
                + completion_tokens * self.completion)

    def savings_pico(self, cached_tokens: int) -> int:
        """What the cached tokens would have cost at the uncached price, minus what they cost."""
        return cached_tokens * (self.prompt - self.cached_prompt)


class PriceTable(BaseModel):
    """Per model (``"*"`` for the rest) and tier. Validated on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str = Field("USD", min_length=1, description="unit of every price and cost (a label; no conversion)")
    tier_multipliers: dict[Literal["priority", "flex", "batch"], Decimal] = Field(
        default_factory=lambda: dict(DEFAULT_MULTIPLIERS),
        description="factor on a model's default prices for a tier it does not price explicitly",
    )
    models: dict[str, ModelPrices] = Field(
        default_factory=lambda: {ANY_MODEL: ModelPrices(default=Price(
            prompt=Decimal("1.00"), cached_prompt=Decimal("0.10"), completion=Decimal("2.00")))},
        description='prices per model name; "*" prices every model not listed',
    )

    _resolved: dict[str, dict[TierName, MicroPrice]] | None = PrivateAttr(None)

    @field_validator("tier_multipliers", mode="before")
    @classmethod
    def _exact_multipliers(cls, v):
        if isinstance(v, dict):
            return {k: Decimal(repr(x)) if isinstance(x, float) else x for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _check(self) -> "PriceTable":
        if ANY_MODEL not in self.models:
            raise ValueError(f'models must include "{ANY_MODEL}" (the price of every model not listed)')
        for tier, m in self.tier_multipliers.items():
            if m < 0:
                raise ValueError(f"tier_multipliers.{tier}: must be >= 0, got {m}")
        self._resolved = self.resolved()  # raises on any inconsistent entry
        return self

    # -- resolution ---------------------------------------------------------------------------
    def _multiplier(self, tier: TierName) -> Decimal:
        if tier == "default":
            return Decimal(1)
        return self.tier_multipliers.get(tier, DEFAULT_MULTIPLIERS[tier])

    def _resolve(self, name: str, mp: ModelPrices, tier: TierName) -> MicroPrice:
        explicit: Price | None = getattr(mp, tier)
        where = f"models.{name}.{tier}"
        if explicit is not None:
            return MicroPrice(_micro(explicit.prompt, f"{where}.prompt"), _micro(explicit.cached_prompt, f"{where}.cached_prompt"),
                              _micro(explicit.completion, f"{where}.completion"))
        base = mp.default
        k = self._multiplier(tier)

        def scaled(v: Decimal, field: str) -> int:
            _micro(v, f"models.{name}.default.{field}")
            return int((v * k * MICRO).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))

        return MicroPrice(scaled(base.prompt, "prompt"), scaled(base.cached_prompt, "cached_prompt"),
                          scaled(base.completion, "completion"))

    def _where(self, name: str, mp: ModelPrices, tier: TierName) -> str:
        if tier == "default" or getattr(mp, tier) is not None:
            return f"models.{name}.{tier}"
        return f"models.{name}.{tier} (default x tier_multipliers.{tier} = {self._multiplier(tier)})"

    def resolved(self) -> dict[str, dict[TierName, MicroPrice]]:
        """Every model's price for every tier, checked: cached <= uncached, flex and batch
        <= default, priority >= default (per component)."""
        out: dict[str, dict[TierName, MicroPrice]] = {}
        for name, mp in self.models.items():
            tiers = {t: self._resolve(name, mp, t) for t in TIERS}
            for t in ("default", "priority", "flex", "batch"):
                p = tiers[t]
                if p.cached_prompt > p.prompt:
                    raise PricesError(f"{self._where(name, mp, t)}: cached_prompt ({_fmt(p.cached_prompt)}) is above prompt "
                                      f"({_fmt(p.prompt)}); cached prompt tokens must not cost more")
            d = tiers["default"]
            for t in ("flex", "batch", "priority"):
                p = tiers[t]
                for field in ("prompt", "cached_prompt", "completion"):
                    a, b = getattr(p, field), getattr(d, field)
                    if (t == "priority" and a < b) or (t != "priority" and a > b):
                        rel = "below" if t == "priority" else "above"
                        raise PricesError(f"{self._where(name, mp, t)}.{field} ({_fmt(a)}) is {rel} the default tier's ({_fmt(b)}); "
                                          f"{t} must cost {'at least' if t == 'priority' else 'at most'} default")
            out[name] = tiers
        return out

    def price(self, model: str, tier: int | TierName) -> MicroPrice:
        """The resolved price of ``model`` (else ``"*"``) at ``tier`` (a name or a kvfleet.v1.Tier value)."""
        name = TIER_BY_VALUE.get(tier, "default") if isinstance(tier, int) else tier
        table = self._cache()
        return (table.get(model) or table[ANY_MODEL])[name]

    def _cache(self) -> dict[str, dict[TierName, MicroPrice]]:
        if self._resolved is None:
            self._resolved = self.resolved()
        return self._resolved


def _fmt(micro: int) -> str:
    return str((Decimal(micro) / MICRO).normalize())


def to_decimal(pico: int) -> Decimal:
    """Pico-units to an exact ``Decimal`` of the currency."""
    return Decimal(pico).scaleb(-12).normalize() if pico else Decimal(0)


def micro_to_decimal(micro: int) -> Decimal:
    return Decimal(micro).scaleb(-6).normalize() if micro else Decimal(0)


def _flatten(exc: pydantic.ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()))
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_prices(data: dict) -> PriceTable:
    """A table from parsed TOML/JSON; ``PricesError`` names the bad entry."""
    try:
        return PriceTable.model_validate(data)
    except pydantic.ValidationError as exc:
        raise PricesError(_flatten(exc)) from exc
    except (PricesError, InvalidOperation) as exc:
        raise PricesError(str(exc)) from exc


def load_prices(path: Path) -> PriceTable:
    """Reads a ``.toml`` or ``.json`` price table (numbers are read as exact decimals)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PricesError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw, parse_float=Decimal)
        else:
            data = tomllib.loads(raw.decode(), parse_float=Decimal)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise PricesError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise PricesError(f"{path}: expected a table at the top level")
    return parse_prices(data)


def table_json(table: PriceTable) -> bytes:
    """The published form (Decimals as strings: exact)."""
    return table.model_dump_json().encode()


def table_from_json(raw: bytes | str) -> PriceTable:
    return parse_prices(json.loads(raw, parse_float=Decimal))
