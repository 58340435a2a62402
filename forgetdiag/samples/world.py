"""A seeded synthetic biography world: people, their six facts, biographies and QA pairs.

It follows the controlled setting of the Spurious Forgetting paper (Zheng et al., ICLR 2025,
after Allen-Zhu & Li's bioS): every person has a birth date, a birth city, a university, a
major, a company and the company's city (each company sits in one city). A biography states the
six facts with one template drawn per fact from several, in a random sentence order, and uses
the full name in every sentence; that is what lets a model trained on biographies answer
questions about people it never saw a question about.

People come in disjoint groups:

* ``a_train`` and ``a_heldout``: group A, whose biographies are pretrained on. Task 0 is QA on
  ``a_train``; ``a_heldout`` measures whether the knowledge is extracted (never taught by QA).
* ``b``: new people for the task 1 of the spurious run (QA only, never in a biography).
* ``c``: the control's people (the control never sees group A).

Example:
    >>> world = make_world(seed=0)
    >>> prompt, answer = qa_pair(world.a_heldout[0], "birth city")
    >>> prompt.endswith("?\\nAnswer:") and answer.startswith(" ")
    True
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from forgetdiag.probes import ProbeItem
from forgetdiag.samples.vocab import (
    CITIES,
    COMPANY_KINDS,
    COMPANY_WORDS,
    DAYS,
    FIRST_NAMES,
    LAST_NAMES,
    MAJORS,
    MONTHS,
    UNIVERSITIES,
    YEARS,
)

ATTRIBUTES = ("birth date", "birth city", "university", "major", "company", "company city")

# Five templates per fact; {name} is the full name, {value} the fact. The last one names the
# attribute as the questions do: some biographies state a fact in the words a question uses,
# as real text does, which makes the knowledge extractable by a small QA fine-tune.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth date": (
        "{name} was born on {value}.",
        "{name} came into this world on {value}.",
        "The birthday of {name} is {value}.",
        "{name} celebrates a birthday on {value}.",
        "The birth date of {name} is {value}.",
    ),
    "birth city": (
        "{name} was born in {value}.",
        "{name} spent the early years in {value}.",
        "The hometown of {name} is {value}.",
        "{name} grew up in {value}.",
        "The birth city of {name} is {value}.",
    ),
    "university": (
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} received an education at {value}.",
        "{name} attended {value}.",
        "The university of {name} is {value}.",
    ),
    "major": (
        "{name} majored in {value}.",
        "{name} completed a degree in {value}.",
        "{name} focused on {value} in college.",
        "{name} specialized in {value}.",
        "The major of {name} is {value}.",
    ),
    "company": (
        "{name} worked for {value}.",
        "{name} was employed by {value}.",
        "{name} had a job at {value}.",
        "{name} built a career at {value}.",
        "The company of {name} is {value}.",
    ),
    "company city": (
        "{name} worked in {value}.",
        "{name} had an office in {value}.",
        "{name} commuted to work in {value}.",
        "{name} was based in {value} for work.",
        "The company city of {name} is {value}.",
    ),
}
QUESTION = "What is the {attribute} of {name}?\nAnswer:"


@dataclass(frozen=True)
class Person:
    """One individual and the six facts about them (values as they appear in text)."""

    name: str
    birth_date: str
    birth_city: str
    university: str
    major: str
    company: str
    company_city: str

    def fact(self, attribute: str) -> str:
        """The value of one of :data:`ATTRIBUTES`, e.g. ``person.fact("birth city")``."""
        return getattr(self, attribute.replace(" ", "_"))


@dataclass(frozen=True)
class World:
    """Disjoint groups of people and the companies' cities."""

    seed: int
    a_train: tuple[Person, ...]
    a_heldout: tuple[Person, ...]
    b: tuple[Person, ...]
    c: tuple[Person, ...]
    company_cities: dict[str, str]

    @property
    def group_a(self) -> tuple[Person, ...]:
        return self.a_train + self.a_heldout

    @property
    def everyone(self) -> tuple[Person, ...]:
        return self.group_a + self.b + self.c


def make_world(seed: int, *, n_a: int = 500, n_b: int = 250, n_c: int = 250, n_companies: int = 40) -> World:
    """Draw a world: unique names, facts drawn uniformly, A split into two halves.

    Args:
        seed: the only source of randomness (same seed, same world).
        n_a: people in group A (halved into ``a_train`` and ``a_heldout``).
        n_b: new people of the spurious run's task 1.
        n_c: the control's people.
        n_companies: distinct companies (each placed in one city).
    """
    rng = random.Random(seed)
    a_names, other_names = _name_pools(rng)
    if n_a > len(a_names) or n_b + n_c > len(other_names):
        raise ValueError(
            f"at most {len(a_names)} people in group A and {len(other_names)} in "
            f"groups B and C; asked for {n_a} and {n_b + n_c}"
        )
    all_companies = [f"{w} {k}" for w in COMPANY_WORDS for k in COMPANY_KINDS]
    companies = rng.sample(all_companies, n_companies)
    company_cities = {company: rng.choice(CITIES) for company in companies}
    names = rng.sample(a_names, n_a) + rng.sample(other_names, n_b + n_c)
    people = [_person(name, rng, company_cities) for name in names]
    half = n_a // 2
    return World(
        seed,
        tuple(people[:half]),
        tuple(people[half:n_a]),
        tuple(people[n_a : n_a + n_b]),
        tuple(people[n_a + n_b :]),
        company_cities,
    )


def _name_pools(rng: random.Random) -> tuple[list[str], list[str]]:
    """Full names for group A and for groups B and C, made of disjoint first and last names.

    Group A shares no name token with the others, so that learning facts about group B moves
    no embedding of group A's names: what task 1 changes in the spurious run is shared
    machinery (the alignment), not the rows that identify group A's people.
    """
    first, last = list(FIRST_NAMES), list(LAST_NAMES)
    rng.shuffle(first)
    rng.shuffle(last)
    f, l = len(first) // 2, len(last) // 2
    pool = lambda fs, ls: [f"{x} {y}" for x in fs for y in ls]
    return pool(first[:f], last[:l]), pool(first[f:], last[l:])


def _person(name: str, rng: random.Random, company_cities: dict[str, str]) -> Person:
    company = rng.choice(sorted(company_cities))
    return Person(
        name,
        _date(rng),
        rng.choice(CITIES),
        rng.choice(UNIVERSITIES),
        rng.choice(MAJORS),
        company,
        company_cities[company],
    )


def _date(rng: random.Random) -> str:
    return f"{rng.choice(MONTHS)} {rng.choice(DAYS)}, {rng.choice(YEARS)}"


def contradict(person: Person, rng: random.Random, company_cities: dict[str, str]) -> Person:
    """The same person with every fact replaced by a different value (a new company, in
    another city, so that the company city changes too)."""
    others = lambda pool, old: [v for v in pool if v != old]
    date = person.birth_date
    while date == person.birth_date:
        date = _date(rng)
    companies = [c for c in sorted(company_cities) if company_cities[c] != person.company_city]
    company = rng.choice(companies)
    return replace(
        person,
        birth_date=date,
        birth_city=rng.choice(others(CITIES, person.birth_city)),
        university=rng.choice(others(UNIVERSITIES, person.university)),
        major=rng.choice(others(MAJORS, person.major)),
        company=company,
        company_city=company_cities[company],
    )


def contradicted(world: World, people: Sequence[Person], seed: int) -> tuple[Person, ...]:
    """:func:`contradict` applied to ``people`` with a generator of its own (``seed``)."""
    rng = random.Random(seed)
    return tuple(contradict(p, rng, world.company_cities) for p in people)


def biography(person: Person, rng: random.Random) -> str:
    """One biography: a template drawn per fact, the six sentences in a random order."""
    sentences = [rng.choice(TEMPLATES[a]).format(name=person.name, value=person.fact(a)) for a in ATTRIBUTES]
    rng.shuffle(sentences)
    return " ".join(sentences)


def biographies(people: Sequence[Person], copies: int, seed: int) -> list[str]:
    """``copies`` freshly drawn biographies of every person (``copies * len(people)`` texts,
    person-major order; the trainer shuffles)."""
    rng = random.Random(seed)
    return [biography(p, rng) for p in people for _ in range(copies)]


def qa_pair(person: Person, attribute: str) -> tuple[str, str]:
    """``("What is the birth city of NAME?\\nAnswer:", " Paris")``: the answer starts with a space."""
    return QUESTION.format(attribute=attribute, name=person.name), " " + person.fact(attribute)


def qa_items(people: Sequence[Person]) -> list[ProbeItem]:
    """Every question about every person, grouped by person (``group`` = the name)."""
    return [ProbeItem(*qa_pair(p, a), group=p.name) for p in people for a in ATTRIBUTES]


def vocabulary_texts(world: World) -> Iterator[str]:
    """Texts that hold every word the world can produce: each template and question filled in
    for each person, and every value of every pool (contradicting facts draw from the pools)."""
    for person in world.everyone:
        for attribute in ATTRIBUTES:
            for template in TEMPLATES[attribute]:
                yield template.format(name=person.name, value=person.fact(attribute))
            yield "".join(qa_pair(person, attribute))
    pools = (FIRST_NAMES, LAST_NAMES, CITIES, UNIVERSITIES, MAJORS, MONTHS, DAYS, YEARS, list(world.company_cities))
    for pool in pools:
        yield " ".join(f"{value}," for value in pool)
