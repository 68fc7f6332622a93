"""Unit tests for the portrait prompt builder (no torch, no services)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from cli import refinery
from producer.prompts import (
    ATTRIBUTES,
    REGIONS,
    PortraitPrompt,
    attribute_distribution,
    build_prompts,
    top_values,
)

REQUIRED = (
    "age_group",
    "gender_presentation",
    "ethnicity_region",
    "skin_tone",
    "hair",
    "expression",
    "lighting",
    "name_locale",
)


@pytest.fixture(scope="module")
def prompts() -> list[PortraitPrompt]:
    return build_prompts(200, seed=0)


def test_same_seed_same_prompts(prompts: list[PortraitPrompt]) -> None:
    assert build_prompts(200, seed=0) == prompts


def test_different_seeds_differ(prompts: list[PortraitPrompt]) -> None:
    other = build_prompts(200, seed=1)
    assert sum(a.text != b.text for a, b in zip(prompts, other)) > 190


def test_prompt_i_does_not_depend_on_count_or_start(prompts: list[PortraitPrompt]) -> None:
    assert build_prompts(5, seed=0) == prompts[:5]
    assert build_prompts(10, seed=0, start=37) == prompts[37:47]
    assert build_prompts(1, seed=0, start=199)[0] == prompts[199]


def test_prompts_are_the_same_in_another_process(prompts: list[PortraitPrompt]) -> None:
    # Faker and `random` must not depend on PYTHONHASHSEED or process state.
    code = "from producer.prompts import build_prompts; print(build_prompts(3, seed=0, start=10)[2].text)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    )
    assert result.stdout.strip() == prompts[12].text


def test_every_prompt_records_every_attribute(prompts: list[PortraitPrompt]) -> None:
    for prompt in prompts:
        assert set(REQUIRED) <= set(ATTRIBUTES) <= set(prompt.attributes)
        assert all(isinstance(v, str) and v for v in prompt.attributes.values())
        assert prompt.attributes["name"] in prompt.text
        assert prompt.attributes["ethnicity"] in prompt.text
        assert prompt.attributes["lighting"] in prompt.text


def test_combinations_are_sensible(prompts: list[PortraitPrompt]) -> None:
    for prompt in prompts:
        a = prompt.attributes
        assert a["ethnicity"] in {d for d, _ in REGIONS[a["ethnicity_region"]]}
        locales = {loc for d, locs in REGIONS[a["ethnicity_region"]] if d == a["ethnicity"] for loc in locs}
        assert a["name_locale"] in locales
        if a["gender_presentation"] != "man":
            assert a["facial_hair"] == "none" and a["hair_style"] != "bald"
        if a["age_group"] == "young_adult":
            assert a["hair_color"] not in ("gray", "silver", "white", "salt and pepper")
        assert 18 <= int(a["age"]) <= 90


def test_distribution_counts_sum_to_count(prompts: list[PortraitPrompt]) -> None:
    distribution = attribute_distribution(prompts)
    assert set(distribution) == set(ATTRIBUTES)
    for attribute, counts in distribution.items():
        assert sum(counts.values()) == len(prompts), attribute
    # Balanced by design: every region and age group drawn, none dominating.
    assert set(distribution["ethnicity_region"]) == set(REGIONS)
    assert max(distribution["ethnicity_region"].values()) < 0.2 * len(prompts)
    assert len(distribution["age_group"]) == 4
    assert set(distribution["gender_presentation"]) == {"woman", "man", "androgynous"}


def test_many_faker_locales_appear(prompts: list[PortraitPrompt]) -> None:
    locales = attribute_distribution(prompts, ["name_locale"])["name_locale"]
    assert len(locales) >= 25
    names = {p.attributes["name"] for p in prompts}
    assert len(names) >= 190


def test_top_values_fold_the_rest_into_one_entry(prompts: list[PortraitPrompt]) -> None:
    distribution = attribute_distribution(prompts)
    shown = top_values(distribution, top=3)
    assert set(shown) == set(ATTRIBUTES)
    regions = shown["ethnicity_region"]
    assert len(regions) == 4 and "more values" in regions[-1][0]
    assert regions[:3] == list(distribution["ethnicity_region"].items())[:3]
    assert sum(count for _, count in regions) == len(prompts)


def test_the_cli_renders_the_distribution_as_a_table() -> None:
    result = CliRunner().invoke(refinery, ["pairs", "prompts", "--count", "200", "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "prompt attribute distribution" in result.output
    assert "ethnicity_region" in result.output and "more values" in result.output


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="count"):
        build_prompts(-1)
    with pytest.raises(ValueError, match="start"):
        build_prompts(1, start=-5)
    assert build_prompts(0) == []


def test_prompts_module_does_not_import_torch() -> None:
    code = "import sys, producer.prompts; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
