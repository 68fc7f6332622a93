"""Portrait prompts for the synthetic pair dataset: seeded, balanced, and auditable.

Wąsala et al. (arXiv 2505.02255) built their 280k-portrait dataset from prompts that vary
age, gender, ethnicity and setting, and added personal names from many cultures because
names diversify the faces a text-to-image model draws. This module does the same:

- every prompt is drawn from its own random stream, keyed by `(seed, index)`, so prompt
  `i` is the same whether 10 or 10 million are built, and a generation job can be resumed
  or sharded by index range (`build_prompts(count, seed, start=...)`);
- choices are conditioned where independence would be nonsense (skin tone and hair texture
  on region, grey hair on age, facial hair on gender presentation, the name's locale on the
  region and the first name on gender presentation);
- every choice is recorded in `PortraitPrompt.attributes`, and `attribute_distribution` /
  `top_values` count them, so a biased prompt set is visible before any GPU time is spent
  on it (`refinery pairs prompts`).

Names come from Faker's locales (one cached `Faker` per locale, reseeded per prompt); a
prompt is deterministic for a given Faker version. Most other words are in the offline
tiny presets' vocabulary (`worker/tiny_flux.py`), so the test doubles see more than
`<unk>`. This module imports no torch: the producer side stays light.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from faker import Faker

# The attributes every prompt records; `attribute_distribution` counts these by default.
# `name` and `age` are recorded too but are near-unique per prompt, so they are not counted.
ATTRIBUTES = (
    "age_group",
    "gender_presentation",
    "ethnicity_region",
    "ethnicity",
    "skin_tone",
    "hair",
    "hair_color",
    "hair_style",
    "facial_hair",
    "expression",
    "clothing",
    "lighting",
    "lens",
    "background",
    "framing",
    "name_locale",
)

# --- age ------------------------------------------------------------------------------
# Adults only: (group, youngest, oldest, words used instead of the number).
AGE_GROUPS = {
    "young_adult": (18, 29, ["young"]),
    "adult": (30, 44, ["adult"]),
    "middle_aged": (45, 64, ["middle-aged"]),
    "senior": (65, 90, ["elderly", "old", "senior"]),
}

# --- gender presentation ----------------------------------------------------------------
# (value, weight, nouns). Androgynous presentation is a minority but always present.
GENDERS = [
    ("woman", 0.45, ["woman"]),
    ("man", 0.45, ["man"]),
    ("androgynous", 0.10, ["androgynous person", "nonbinary person"]),
]

# --- ethnicity / region -----------------------------------------------------------------
# Each region lists (descriptor used in the prompt, Faker locales whose names fit it).
# Locales without their own person names in Faker (they fall back to en_US) are avoided,
# except where English names are what the descriptor's people commonly carry.
REGIONS: dict[str, list[tuple[str, list[str]]]] = {
    "east_asian": [("chinese", ["zh_CN", "zh_TW"]), ("japanese", ["ja_JP"]), ("korean", ["ko_KR"])],
    "southeast_asian": [
        ("vietnamese", ["vi_VN"]),
        ("thai", ["th_TH"]),
        ("indonesian", ["id_ID"]),
        ("filipino", ["en_PH"]),
    ],
    "south_asian": [
        ("indian", ["hi_IN", "ta_IN", "gu_IN", "mr_IN", "en_IN"]),
        ("pakistani", ["en_PK"]),
        ("bangladeshi", ["bn_BD"]),
        ("nepali", ["ne_NP"]),
        ("sri lankan", ["si_LK"]),
    ],
    "middle_eastern_north_african": [
        ("arab", ["ar_SA", "ar_PS", "ar_AA"]),
        ("algerian", ["ar_DZ"]),
        ("persian", ["fa_IR"]),
        ("turkish", ["tr_TR"]),
        ("israeli", ["he_IL"]),
    ],
    "sub_saharan_african": [
        ("nigerian", ["yo_NG", "ig_NG", "ha_NG", "en_NG"]),
        ("ghanaian", ["tw_GH"]),
        ("kenyan", ["en_KE", "sw"]),
        ("south african", ["zu_ZA"]),
    ],
    "northern_western_european": [
        ("irish", ["en_IE", "ga_IE"]),
        ("british", ["en_GB"]),
        ("german", ["de_DE", "de_AT"]),
        ("french", ["fr_FR"]),
        ("dutch", ["nl_NL"]),
        ("scandinavian", ["sv_SE", "no_NO", "da_DK"]),
        ("finnish", ["fi_FI"]),
        ("icelandic", ["is_IS"]),
    ],
    "southern_european": [
        ("italian", ["it_IT"]),
        ("spanish", ["es_ES"]),
        ("portuguese", ["pt_PT"]),
        ("greek", ["el_GR"]),
    ],
    "eastern_european": [
        ("polish", ["pl_PL"]),
        ("russian", ["ru_RU"]),
        ("ukrainian", ["uk_UA"]),
        ("czech", ["cs_CZ"]),
        ("hungarian", ["hu_HU"]),
        ("romanian", ["ro_RO"]),
        ("croatian", ["hr_HR"]),
        ("baltic", ["lt_LT", "lv_LV", "et_EE"]),
    ],
    "latin_american": [
        ("mexican", ["es_MX"]),
        ("brazilian", ["pt_BR"]),
        ("argentinian", ["es_AR"]),
        ("colombian", ["es_CO"]),
        ("chilean", ["es_CL"]),
    ],
    "central_asian_caucasian": [
        ("georgian", ["ka_GE"]),
        ("armenian", ["hy_AM"]),
        ("azerbaijani", ["az_AZ"]),
        ("uzbek", ["uz_UZ"]),
    ],
    "mixed": [("mixed race", ["en_US", "en_GB", "fr_CA", "pt_BR", "en_CA"])],
}

# Locales that write the family name first, and those that write a name without a space.
FAMILY_NAME_FIRST = {"zh_CN", "zh_TW", "ja_JP", "ko_KR", "hu_HU", "vi_VN"}
NO_SPACE = {"zh_CN", "zh_TW", "ja_JP", "ko_KR"}

# Skin tones (light to deep) with plausible weights per region; an absent tone is never drawn.
SKIN_TONES = ("fair", "light", "olive", "tan", "brown", "dark brown", "deep brown")
REGION_SKIN: dict[str, dict[str, float]] = {
    "east_asian": {"fair": 2, "light": 3, "olive": 1, "tan": 1},
    "southeast_asian": {"light": 1, "olive": 2, "tan": 3, "brown": 2},
    "south_asian": {"light": 1, "olive": 2, "tan": 2, "brown": 3, "dark brown": 2},
    "middle_eastern_north_african": {"fair": 1, "light": 2, "olive": 3, "tan": 2, "brown": 1},
    "sub_saharan_african": {"brown": 2, "dark brown": 3, "deep brown": 3},
    "northern_western_european": {"fair": 3, "light": 3, "olive": 1},
    "southern_european": {"fair": 1, "light": 2, "olive": 3, "tan": 2},
    "eastern_european": {"fair": 3, "light": 3, "olive": 1},
    "latin_american": {"fair": 1, "light": 2, "olive": 2, "tan": 3, "brown": 2, "dark brown": 1},
    "central_asian_caucasian": {"fair": 1, "light": 3, "olive": 3, "tan": 1},
    "mixed": {"light": 1, "olive": 2, "tan": 2, "brown": 2, "dark brown": 1},
}

# Natural hair colours per region (weights); grey and silver come from age, dyed colours
# from a small chance for younger adults.
REGION_HAIR_COLOR: dict[str, dict[str, float]] = {
    "east_asian": {"black": 6, "dark brown": 3},
    "southeast_asian": {"black": 6, "dark brown": 3},
    "south_asian": {"black": 6, "dark brown": 3},
    "middle_eastern_north_african": {"black": 4, "dark brown": 4, "brown": 1},
    "sub_saharan_african": {"black": 8, "dark brown": 2},
    "northern_western_european": {"blonde": 3, "brown": 3, "dark brown": 2, "red": 1, "auburn": 1},
    "southern_european": {"black": 3, "dark brown": 4, "brown": 2},
    "eastern_european": {"blonde": 2, "light brown": 3, "brown": 3, "dark brown": 2},
    "latin_american": {"black": 4, "dark brown": 4, "brown": 2},
    "central_asian_caucasian": {"black": 4, "dark brown": 4},
    "mixed": {"black": 3, "dark brown": 3, "brown": 2, "auburn": 1},
}
DYED_COLORS = ["pink", "blue", "purple", "platinum blonde", "red"]

# Hair texture per region (weights): it decides which styles are drawn.
REGION_TEXTURE: dict[str, dict[str, float]] = {
    "sub_saharan_african": {"coily": 6, "curly": 3, "wavy": 1},
    "mixed": {"coily": 2, "curly": 4, "wavy": 3, "straight": 1},
    "latin_american": {"straight": 3, "wavy": 4, "curly": 3},
    "middle_eastern_north_african": {"straight": 2, "wavy": 5, "curly": 3},
}
DEFAULT_TEXTURE: dict[str, float] = {"straight": 5, "wavy": 3, "curly": 2}

# Styles per (gender presentation, texture); "{color}" is filled in. Bald comes from age.
HAIR_STYLES: dict[str, dict[str, list[str]]] = {
    "woman": {
        "straight": [
            "long straight {color} hair",
            "a {color} bob",
            "{color} hair in a ponytail",
            "shoulder length {color} hair",
            "a {color} pixie cut",
            "{color} hair in a bun",
        ],
        "wavy": [
            "long wavy {color} hair",
            "shoulder length wavy {color} hair",
            "a wavy {color} bob",
            "{color} hair in a messy bun",
        ],
        "curly": ["long curly {color} hair", "short curly {color} hair", "curly {color} hair in a bun"],
        "coily": [
            "a {color} afro",
            "{color} box braids",
            "{color} locs",
            "short coily {color} hair",
            "{color} braids in a bun",
        ],
    },
    "man": {
        "straight": [
            "short {color} hair",
            "a {color} crew cut",
            "a {color} buzz cut",
            "slicked back {color} hair",
            "a {color} undercut",
            "{color} hair parted to the side",
        ],
        "wavy": ["short wavy {color} hair", "medium length wavy {color} hair", "tousled {color} hair"],
        "curly": ["short curly {color} hair", "medium length curly {color} hair"],
        "coily": [
            "a {color} buzz cut",
            "short coily {color} hair",
            "{color} locs",
            "a short {color} afro",
            "{color} braids",
        ],
    },
    "androgynous": {
        "straight": [
            "a {color} pixie cut",
            "short {color} hair",
            "a {color} undercut",
            "shoulder length {color} hair",
            "a {color} bob",
        ],
        "wavy": ["tousled {color} hair", "short wavy {color} hair", "medium length wavy {color} hair"],
        "curly": ["short curly {color} hair", "medium length curly {color} hair"],
        "coily": ["a {color} afro", "{color} locs", "short coily {color} hair", "a {color} buzz cut"],
    },
}

FACIAL_HAIR: dict[str, float] = {"clean shaven": 5, "stubble": 3, "a full beard": 2, "a mustache": 1, "a goatee": 1}

EXPRESSIONS = [
    "smiling",
    "laughing",
    "a gentle smile",
    "a shy smile",
    "a serious expression",
    "a neutral expression",
    "a pensive expression",
    "a calm expression",
    "a confident expression",
    "a surprised expression",
    "a thoughtful gaze",
    "a stern expression",
]

CLOTHING_ANY = [
    "a {c} sweater",
    "a {c} hoodie",
    "a denim jacket",
    "a black leather jacket",
    "a {c} turtleneck",
    "a {c} t-shirt",
    "a white collared shirt",
    "a {c} knitted wool sweater",
    "a {c} linen shirt",
    "a {c} blazer",
    "a {c} coat and scarf",
    "a striped shirt",
    "a lab coat",
    "{c} scrubs",
    "a {c} jacket",
]
CLOTHING_BY_GENDER = {
    "woman": ["a {c} silk blouse", "a {c} dress", "a {c} blouse and necklace"],
    "man": ["a {c} suit and tie", "a {c} business suit"],
    "androgynous": ["a {c} oversized shirt", "a {c} suit"],
}
# Head coverings that fit a region and presentation: (regions, gender, phrase).
HEADWEAR = [
    ({"middle_eastern_north_african", "southeast_asian", "south_asian"}, "woman", "a {c} hijab"),
    ({"south_asian"}, "man", "a {c} turban"),
    ({"sub_saharan_african"}, "woman", "a {c} headscarf"),
]
COLORS = [
    "black",
    "white",
    "gray",
    "navy",
    "blue",
    "green",
    "red",
    "beige",
    "cream",
    "brown",
    "maroon",
    "teal",
    "yellow",
    "orange",
    "purple",
    "pink",
]

LIGHTING = [
    "soft window light",
    "golden hour sunlight",
    "studio softbox lighting",
    "rembrandt lighting",
    "butterfly lighting",
    "overcast daylight",
    "dramatic rim light",
    "backlit by the sun",
    "neon lighting",
    "warm candlelight",
    "split lighting",
    "soft diffused natural light",
    "cinematic low key lighting",
    "high key studio lighting",
]

LENSES = [
    "85 mm lens, f/1.8",
    "50 mm lens, f/1.4",
    "35 mm lens, f/2",
    "105 mm lens, f/2.8",
    "shot on canon dslr, 85 mm",
    "shot on nikon dslr, 50 mm",
    "sony mirrorless camera, 85 mm f/1.4",
    "fujifilm camera, 56 mm f/1.2",
    "leica camera, 50 mm",
    "kodak portra film, analog photo",
]

BACKGROUNDS = [
    "a plain gray studio backdrop",
    "a seamless white backdrop",
    "a solid beige background",
    "a blurred city street",
    "a park with trees",
    "a brick wall",
    "a cafe",
    "a library",
    "an office",
    "a beach at sunset",
    "a forest",
    "a kitchen",
    "mountains",
    "a concrete wall",
    "a garden",
    "a blurred night city with neon",
]

FRAMINGS = ["close up portrait", "headshot", "head and shoulders portrait", "upper body portrait"]

QUALITY = [
    "photorealistic",
    "sharp focus",
    "detailed skin texture",
    "natural skin pores",
    "high detail",
    "8k",
    "professional photography",
    "film grain",
]


@dataclass(frozen=True)
class PortraitPrompt:
    """One prompt and every choice that made it (all values are strings, for manifests)."""

    text: str
    attributes: dict[str, str] = field(hash=False)


_FAKERS: dict[str, Faker] = {}


def _faker(locale: str) -> Faker:
    # One Faker per locale, reseeded per prompt: building one is slow, reseeding is cheap.
    if locale not in _FAKERS:
        _FAKERS[locale] = Faker(locale)
    return _FAKERS[locale]


def _weighted(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _person_name(rng: random.Random, locale: str, gender: str) -> str:
    fake = _faker(locale)
    fake.seed_instance(rng.getrandbits(64))
    if gender == "woman":
        first = fake.first_name_female()
    elif gender == "man":
        first = fake.first_name_male()
    else:
        first = fake.first_name()
    last = fake.last_name()
    parts = (last, first) if locale in FAMILY_NAME_FIRST else (first, last)
    return ("" if locale in NO_SPACE else " ").join(parts)


def _hair(rng: random.Random, region: str, gender: str, age_group: str, age: int) -> tuple[str, str, str]:
    """(phrase, colour, style template) for the hair; balding and grey come with age."""
    # Grey first appears in the forties and is the rule among seniors.
    grey_chance = {"young_adult": 0.0, "adult": 0.08, "middle_aged": 0.4, "senior": 0.85}[age_group]
    if rng.random() < grey_chance:
        color = rng.choice(["gray", "silver", "salt and pepper"] if age < 75 else ["gray", "silver", "white"])
    elif age_group == "young_adult" and rng.random() < 0.08:
        color = rng.choice(DYED_COLORS)
    else:
        color = _weighted(rng, REGION_HAIR_COLOR[region])

    bald_chance = {"man": {"young_adult": 0.03, "adult": 0.1, "middle_aged": 0.25, "senior": 0.35}}
    if rng.random() < bald_chance.get(gender, {}).get(age_group, 0.0):
        return "a bald head", "none", "bald"
    texture = _weighted(rng, REGION_TEXTURE.get(region, DEFAULT_TEXTURE))
    style = rng.choice(HAIR_STYLES[gender][texture])
    return style.format(color=color), color, style.replace("{color} ", "").replace(" {color}", "")


def _article(word: str) -> str:
    # "an" before a vowel sound: "an elderly", "an 18-year-old", "an 83-year-old".
    if word.isdigit():
        return "an" if word.startswith("8") or word in ("11", "18") else "a"
    return "an" if word[0] in "aeiou" else "a"


def _prompt(seed: int, index: int) -> PortraitPrompt:
    # A string seed is hashed with SHA-512 by `random`: the same stream in every process,
    # independent of PYTHONHASHSEED and of every other prompt.
    rng = random.Random(f"face-refinery/portraits/{seed}/{index}")

    # 1. Who: age, gender presentation, region and the descriptor within it.
    age_group = rng.choice(list(AGE_GROUPS))
    youngest, oldest, age_words = AGE_GROUPS[age_group]
    age = rng.randint(youngest, oldest)
    gender, _, nouns = rng.choices(GENDERS, weights=[g[1] for g in GENDERS])[0]
    noun = rng.choice(nouns)
    region = rng.choice(list(REGIONS))
    ethnicity, locales = rng.choice(REGIONS[region])
    locale = rng.choice(locales)
    name = _person_name(rng, locale, gender)

    # 2. What they look like: skin, hair, facial hair, expression, clothes.
    skin = _weighted(rng, REGION_SKIN[region])
    hair, hair_color, hair_style = _hair(rng, region, gender, age_group, age)
    facial_hair = _weighted(rng, FACIAL_HAIR) if gender == "man" else "none"
    expression = rng.choice(EXPRESSIONS)
    color = rng.choice(COLORS)
    headwear = [phrase for regions, g, phrase in HEADWEAR if region in regions and g == gender]
    if headwear and rng.random() < 0.15:
        clothing = rng.choice(headwear).format(c=color)
        hair_phrase = None  # covered hair is not described
    else:
        clothing = rng.choice(CLOTHING_ANY + CLOTHING_BY_GENDER[gender]).format(c=color)
        hair_phrase = hair

    # 3. How it is shot: lighting, lens, background, framing.
    lighting = rng.choice(LIGHTING)
    lens = rng.choice(LENSES)
    background = rng.choice(BACKGROUNDS)
    framing = rng.choice(FRAMINGS)

    # 4. Words: the age as a number or as words, a few sentence shapes, optional quality tags.
    if rng.random() < 0.5:
        who = f"{_article(str(age))} {age}-year-old {ethnicity} {noun}"
    else:
        word = rng.choice(age_words)
        who = f"{_article(word)} {word} {ethnicity} {noun}"
    looks = [f"{skin} skin"]
    if hair_phrase:
        looks.append(f"with {hair_phrase}")
    if facial_hair not in ("none", "clean shaven"):
        looks.append(f"with {facial_hair}")
    elif facial_hair == "clean shaven":
        looks.append("clean shaven")
    looks.append(
        expression if expression.startswith("smiling") or expression.startswith("laughing") else f"with {expression}"
    )
    shape = rng.randrange(3)
    if shape == 0:
        text = f"{framing} of {name}, {who}, {', '.join(looks)}, wearing {clothing}"
    elif shape == 1:
        text = f"{framing} of {who} named {name}, {', '.join(looks)}, wearing {clothing}"
    else:
        text = f"{name}, {who} wearing {clothing}, {', '.join(looks)}, {framing}"
    text += f", {lighting}, in front of {background}, {lens}"
    tags = rng.sample(QUALITY, k=rng.randint(0, 3))
    if tags:
        text += ", " + ", ".join(tags)

    attributes = {
        "age_group": age_group,
        "age": str(age),
        "gender_presentation": gender,
        "ethnicity_region": region,
        "ethnicity": ethnicity,
        "skin_tone": skin,
        "hair": hair if hair_phrase else "covered",
        "hair_color": hair_color,
        "hair_style": hair_style if hair_phrase else "covered",
        "facial_hair": facial_hair,
        "expression": expression,
        "clothing": clothing,
        "lighting": lighting,
        "lens": lens,
        "background": background,
        "framing": framing,
        "name": name,
        "name_locale": locale,
    }
    return PortraitPrompt(text=text, attributes=attributes)


def build_prompts(count: int, seed: int = 0, start: int = 0) -> list[PortraitPrompt]:
    """Prompts `start .. start + count - 1` of the set named by `seed`.

    Prompt `i` depends on `(seed, i)` alone, so any range of the set can be built on its own
    (a resumed or sharded job builds exactly the prompts it would have built in one go).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    return [_prompt(seed, index) for index in range(start, start + count)]


def attribute_distribution(
    prompts: list[PortraitPrompt], attributes: tuple[str, ...] | list[str] | None = None
) -> dict[str, dict[str, int]]:
    """Counts per value of each attribute, most common first: `{attribute: {value: count}}`.

    `attributes` defaults to `ATTRIBUTES` (everything recorded except the near-unique name and
    age). The counts of each attribute sum to `len(prompts)`; a prompt that lacks an
    attribute (e.g. a manifest row from an older builder) counts as `"(missing)"`.
    """
    names = ATTRIBUTES if attributes is None else tuple(attributes)
    distribution = {}
    for name in names:
        counts = Counter(prompt.attributes.get(name, "(missing)") for prompt in prompts)
        distribution[name] = dict(counts.most_common())
    return distribution


def top_values(distribution: dict[str, dict[str, int]], top: int = 12) -> dict[str, list[tuple[str, int]]]:
    """Each attribute's `top` most common `(value, count)` pairs and one
    `("(N more values)", count)` pair for the rest: short enough that a skew (one region at
    40%, no seniors) shows at a glance, and the counts still sum to the total.
    """
    shown: dict[str, list[tuple[str, int]]] = {}
    for attribute, counts in distribution.items():
        items = list(counts.items())
        head, rest = items[:top], items[top:]
        if rest:
            head.append((f"({len(rest)} more values)", sum(count for _, count in rest)))
        shown[attribute] = head
    return shown
