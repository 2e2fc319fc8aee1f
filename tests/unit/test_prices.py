"""The price table: exact micro-unit prices, tier derivation, validation naming the entry."""

from __future__ import annotations

import json
import tomllib
from decimal import Decimal
from pathlib import Path

import pytest

from kvfleet.controller.prices import (
    MicroPrice, PriceTable, PricesError, load_prices, parse_prices, table_from_json, table_json, to_decimal,
)

EXAMPLE_TOML = """
currency = "EUR"

[tier_multipliers]
priority = 2
flex = 0.5
batch = 0.25

[models."*".default]
prompt = 0.30
cached_prompt = 0.03
completion = 0.60

[models."llama-3-8b".default]
prompt = 0.10
cached_prompt = 0.01
completion = 0.20

[models."llama-3-8b".batch]
prompt = 0.04
cached_prompt = 0.004
completion = 0.08
"""


def test_builtin_defaults_price_flex_and_batch_below_default_and_priority_above():
    t = PriceTable()
    d, p, f, b = (t.price("any-model", tier) for tier in ("default", "priority", "flex", "batch"))
    assert d == MicroPrice(1_000_000, 100_000, 2_000_000)
    for field in ("prompt", "cached_prompt", "completion"):
        assert getattr(f, field) < getattr(d, field) < getattr(p, field)
        assert getattr(b, field) < getattr(d, field)
    assert all(x.cached_prompt < x.prompt for x in (d, p, f, b))


def test_tier_values_map_like_the_wire_enum_and_auto_is_default():
    t = PriceTable()
    assert t.price("m", 0) == t.price("m", 2) == t.price("m", "default")
    assert t.price("m", 1) == t.price("m", "priority")
    assert t.price("m", 3) == t.price("m", "flex")
    assert t.price("m", 4) == t.price("m", "batch")


def test_toml_file_reads_decimals_exactly_and_explicit_tiers_win(tmp_path: Path):
    f = tmp_path / "prices.toml"
    f.write_text(EXAMPLE_TOML)
    t = load_prices(f)
    assert t.currency == "EUR"
    assert t.price("llama-3-8b", "default") == MicroPrice(100_000, 10_000, 200_000)
    assert t.price("llama-3-8b", "batch") == MicroPrice(40_000, 4_000, 80_000)        # explicit
    assert t.price("llama-3-8b", "flex") == MicroPrice(50_000, 5_000, 100_000)        # 0.5 x default
    assert t.price("llama-3-8b", "priority") == MicroPrice(200_000, 20_000, 400_000)  # 2 x default
    assert t.price("other", "batch") == MicroPrice(75_000, 7_500, 150_000)            # "*" x 0.25


def test_json_file_and_published_form_round_trip_exactly(tmp_path: Path):
    f = tmp_path / "prices.json"
    f.write_text(json.dumps({"models": {"*": {"default": {"prompt": 0.1, "cached_prompt": 0.01, "completion": 0.3}}}}))
    t = load_prices(f)
    assert t.price("m", "default") == MicroPrice(100_000, 10_000, 300_000)
    assert table_from_json(table_json(t)).resolved() == t.resolved()


def test_cost_and_savings_are_exact_integers():
    p = MicroPrice(prompt=1_000_000, cached_prompt=100_000, completion=2_000_000)   # 1, 0.1, 2 per 1M tokens
    # 1000 prompt tokens of which 640 cached, 16 completion tokens
    assert p.cost_pico(1000, 640, 16) == 360 * 1_000_000 + 640 * 100_000 + 16 * 2_000_000
    assert to_decimal(p.cost_pico(1000, 640, 16)) == Decimal("0.000456")
    assert to_decimal(p.savings_pico(640)) == Decimal("0.000576")
    # Ten million requests of 7 tokens at a price no float holds exactly still sum exactly.
    q = MicroPrice(prompt=333_333, cached_prompt=0, completion=0)
    assert to_decimal(sum(q.cost_pico(7, 0, 0) for _ in range(1000)) * 10_000) == Decimal("23.333310")


@pytest.mark.parametrize("data, message", [
    ({"models": {"*": {"default": {"prompt": 1, "cached_prompt": 2, "completion": 1}}}},
     "models.*.default: cached_prompt (2) is above prompt (1)"),
    ({"models": {"m": {"default": {"prompt": 1, "cached_prompt": 0.5, "completion": 1}}}},
     'models must include "*"'),
    ({"models": {"*": {"default": {"prompt": 1, "cached_prompt": 0.5, "completion": 1},
                       "flex": {"prompt": 2, "cached_prompt": 0.5, "completion": 1}}}},
     "models.*.flex.prompt (2) is above the default tier's (1)"),
    ({"models": {"*": {"default": {"prompt": 1, "cached_prompt": 0.5, "completion": 1},
                       "priority": {"prompt": 1, "cached_prompt": 0.5, "completion": 0.5}}}},
     "models.*.priority.completion (0.5) is below the default tier's (1)"),
    ({"tier_multipliers": {"batch": 1.5}}, "tier_multipliers.batch = 1.5).prompt"),
    ({"models": {"*": {"default": {"prompt": "1.0000001", "cached_prompt": 0, "completion": 1}}}},
     "models.*.default.prompt: 1.0000001 has more than 6 decimal places"),
    ({"models": {"*": {"default": {"prompt": -1, "cached_prompt": 0, "completion": 1}}}},
     "models.*.default.prompt: Input should be greater than or equal to 0"),
    ({"models": {"*": {"default": {"prompt": 1, "cached_prompt": 0, "completion": 1, "extra": 3}}}},
     "models.*.default.extra"),
    ({"tier_multipliers": {"default": 2}}, "tier_multipliers.default"),
])
def test_bad_tables_are_rejected_naming_the_entry(data, message):
    with pytest.raises(PricesError) as exc:
        parse_prices(data)
    assert message in str(exc.value)


def test_unreadable_or_malformed_files_name_the_file(tmp_path: Path):
    with pytest.raises(PricesError, match="cannot read"):
        load_prices(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("models = [")
    with pytest.raises(PricesError, match="bad.toml: not valid TOML"):
        load_prices(bad)


def test_the_documented_example_table_is_valid():
    doc = (Path(__file__).parents[2] / "docs" / "accounting.md").read_text()
    block = doc.split("```toml", 1)[1].split("```", 1)[0]
    t = parse_prices(tomllib.loads(block, parse_float=Decimal))
    assert t.price("llama-3-8b", "batch") == MicroPrice(80_000, 8_000, 240_000)
    assert t.price("llama-3-8b", "flex") == MicroPrice(100_000, 10_000, 300_000)
