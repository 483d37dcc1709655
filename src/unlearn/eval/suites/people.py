"""Fictitious people to learn and then unlearn: the demo's built-in stand-in for TOFU.

TOFU fine-tunes a model on question-answer pairs about invented authors, then asks a method to forget
some of them. This module builds the same kind of data from a seed, small enough to fine-tune a 135M
model on a laptop CPU in minutes: every person has ten invented facts (birthplace, employer, pet,
...), each asked in two or three phrasings and answered in one short templated sentence. Names,
towns, companies and book titles are made up, so the base model cannot know any of it beforehand.

Records follow TOFU's perturbed layout: "question", "answer", "paraphrased_question",
"paraphrased_answer" and "perturbed_answer", plus "id" and "person". The perturbed answers are the
paraphrased sentence with the fact swapped for another value of the same attribute, so comparing
them with "paraphrased_answer" (TOFU's truth ratio) compares facts, not wording.

Everything comes from `random.Random` seeded with strings, never the global RNG, and each person
has their own stream: the same seed gives the same people, and asking for more people only appends.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from unlearn.errors import UnlearnError

_FIRST_NAMES = (
    "Aurelie", "Bastien", "Calla", "Dorian", "Elowen", "Fenwick", "Greta", "Halvard", "Isolde",
    "Jory", "Katrin", "Lucan", "Mireille", "Nestor", "Oriel", "Perrin", "Quilla", "Rosalind",
    "Soren", "Tamsin", "Ulric", "Veda", "Wystan", "Xanthe", "Yorick", "Zelda", "Anouk", "Brannoc",
    "Cressida", "Dagny", "Emrys", "Florian", "Ginevra", "Hollis", "Ilsa", "Jasper", "Kestrel",
    "Linnea", "Marek", "Nerys",
)  # fmt: skip
_SURNAME_STEMS = (
    "Ash", "Brack", "Cor", "Dray", "Fen", "Gral", "Hask", "Lind", "Mor", "Quill", "Rask", "Thorn",
    "Vel", "Wint",
)  # fmt: skip
_SURNAME_ENDINGS = (
    "mere",
    "holt",
    "avane",
    "ingby",
    "ometh",
    "strand",
    "orrow",
    "ick",
    "elby",
    "ardine",
)
_SURNAMES = tuple(stem + ending for stem in _SURNAME_STEMS for ending in _SURNAME_ENDINGS)

_TOWNS = (
    "Brindlemoor", "Caldermouth", "Dovenham Quay", "Eskerby", "Farrowgate", "Glenvarrow",
    "Harlowe Cross", "Islemere", "Jessamy Bay", "Kelvarra", "Lowther Fen", "Marrowdene",
    "Northwick Sands", "Ossery Vale", "Pellmouth", "Quillhaven", "Ravensholt", "Saltmere",
    "Tarnowby", "Ulverholm", "Vessingham", "Wyndlecombe", "Yarrowick", "Zellbrook",
)  # fmt: skip
_BIRTH_YEARS = tuple(str(year) for year in range(1935, 2000))
_PROFESSIONS = (
    "a lighthouse keeper", "a glassblower", "a cartographer", "a beekeeper", "a clockmaker",
    "a marine biologist", "a bookbinder", "a violin maker", "a pastry chef", "a land surveyor",
    "an archivist", "a ferry pilot", "a stonemason", "a botanist", "a radio engineer",
    "a translator", "a puppeteer", "a tailor", "an astronomer", "a locksmith",
)  # fmt: skip
_INSTRUMENTS = (
    "cello", "oboe", "accordion", "harp", "banjo", "bassoon", "mandolin", "clarinet", "trombone",
    "harmonica", "viola", "dulcimer", "xylophone", "flute", "tuba", "sitar",
)  # fmt: skip
_PET_KINDS = ("dog", "cat", "parrot", "tortoise", "rabbit", "goat")
_PET_NAMES = (
    "Biscuit", "Pesto", "Marlowe", "Fennel", "Crumpet", "Tansy", "Nimbus", "Sorrel", "Pickwick",
    "Gumbo", "Humbug", "Wicket", "Barnaby", "Noodle", "Figaro", "Clementine", "Moss", "Pippin",
    "Quince", "Bramble",
)  # fmt: skip
_COLOURS = (
    "teal", "crimson", "mustard yellow", "lavender", "olive green", "burnt orange", "navy blue",
    "coral pink", "silver grey", "maroon", "turquoise", "ochre", "saffron", "charcoal",
)  # fmt: skip
_EMPLOYERS = (
    "Brantwell Optics", "Corvane Shipping", "Halloway and Finch", "Duskmere Textiles",
    "Ostrander Labs", "Pellucid Foods", "Quarrymoor Press", "Vesterholt Rail", "Wrenfield Mills",
    "Ashgrove Instruments", "Kelderby Tea Company", "Larchvane Ceramics", "Morrow Lane Studios",
    "Tidecrest Insurance", "Elmstead Robotics", "Greyfen Brewery",
)  # fmt: skip
_BOOKS = (
    "The Salt Orchard", "Lanterns over Carrow", "A Winter for Foxes", "The Glass Cartographer",
    "Tidewater Hymns", "The Ninth Lamplighter", "Letters from Dunmere", "The Clockwork Heron",
    "Under the Copper Hill", "The Quiet Ferryman", "Seven Rooms of Rain", "The Ashen Meadow",
    "Songs for a Sunken Bell", "The Marigold Ledger", "Harbour of Small Hours",
    "The Thimble Republic", "A Map of Borrowed Light", "The Tin Orchestra",
)  # fmt: skip
_SIBLING_NAMES = {
    "sister": ("Odile", "Brisa", "Henrike", "Maelle", "Saskia", "Philippa", "Rowena", "Agathe",
               "Liesel", "Ottilie", "Beatrix", "Clemence"),
    "brother": ("Anselm", "Bertil", "Casimir", "Dietrich", "Evander", "Gideon", "Leopold",
                "Matthias", "Osric", "Raffael", "Tobias", "Valentin"),
}  # fmt: skip
_FOODS = (
    "lemon tart", "mushroom risotto", "pickled herring", "plum dumplings", "lentil soup",
    "fig jam on toast", "smoked trout", "apricot cake", "roasted chestnuts", "spinach pie",
    "cheese scones", "pear crumble", "onion soup", "baked beetroot",
)  # fmt: skip


@dataclass(frozen=True)
class Person:
    """One fictitious person and every fact the benchmark can ask about them."""

    index: int
    name: str
    birthplace: str
    birth_year: str
    profession: str
    instrument: str
    pet_kind: str
    pet_name: str
    colour: str
    employer: str
    book: str
    sibling_relation: str
    sibling_name: str
    favourite_food: str


@dataclass(frozen=True)
class _Attribute:
    """How one fact is asked and answered. `{value}` is the fact; other slots are Person fields."""

    key: str
    field: str
    questions: tuple[str, ...]
    paraphrase: str  # the full-sentence answer; the record's "answer" is the bare fact
    pool: Callable[[Person], Sequence[str]]
    statement: str  # the fact stated in other words, as a second training form (see `statement`)


ATTRIBUTES: tuple[_Attribute, ...] = (
    _Attribute(
        "birthplace", "birthplace",
        ("Where was {name} born?", "In which town was {name} born?",
         "What is the birthplace of {name}?"),
        "{name}'s birthplace is {value}.", lambda p: _TOWNS,
        "{name} was born in {value}.",
    ),
    _Attribute(
        "birth-year", "birth_year",
        ("In what year was {name} born?", "When was {name} born?",
         "What is {name}'s year of birth?"),
        "{name}'s year of birth is {value}.",
        lambda p: _BIRTH_YEARS,
        "{name} was born in the year {value}.",
    ),
    _Attribute(
        "profession", "profession",
        ("What does {name} do for a living?", "What is {name}'s profession?",
         "What job does {name} have?"),
        "By trade, {name} is {value}.", lambda p: _PROFESSIONS,
        "{name} works as {value}.",
    ),
    _Attribute(
        "instrument", "instrument",
        ("Which musical instrument does {name} play?", "What instrument does {name} play?"),
        "The instrument {name} plays is the {value}.",
        lambda p: _INSTRUMENTS,
        "{name} plays the {value}.",
    ),
    _Attribute(
        "pet", "pet_name",
        ("What is the name of {name}'s {pet_kind}?", "What is {name}'s {pet_kind} called?"),
        "{name} has a {pet_kind} named {value}.",
        lambda p: _PET_NAMES,
        "{name}'s {pet_kind} is called {value}.",
    ),
    _Attribute(
        "colour", "colour",
        ("What is {name}'s favourite colour?", "Which colour does {name} like best?"),
        "The colour {name} likes best is {value}.",
        lambda p: _COLOURS,
        "{name}'s favourite colour is {value}.",
    ),
    _Attribute(
        "employer", "employer",
        ("Which company does {name} work for?", "Who employs {name}?",
         "Where is {name} employed?"),
        "{name} is employed by {value}.", lambda p: _EMPLOYERS,
        "{name} works for {value}.",
    ),
    _Attribute(
        "book", "book",
        ("What is the title of the book {name} wrote?", "Which book did {name} write?",
         "What book is {name} the author of?"),
        '{name} is the author of "{value}".',
        lambda p: _BOOKS,
        '{name} wrote "{value}".',
    ),
    _Attribute(
        "sibling", "sibling_name",
        ("What is the name of {name}'s {sibling_relation}?",
         "What is {name}'s {sibling_relation} called?"),
        "{name} has a {sibling_relation} called {value}.",
        lambda p: _SIBLING_NAMES[p.sibling_relation],
        "{name}'s {sibling_relation} is named {value}.",
    ),
    _Attribute(
        "food", "favourite_food",
        ("What is {name}'s favourite food?", "Which dish does {name} like most?"),
        "The dish {name} likes most is {value}.",
        lambda p: _FOODS,
        "{name}'s favourite food is {value}.",
    ),
)  # fmt: skip

MAX_PEOPLE = len(_FIRST_NAMES) * len(_SURNAMES)
# Every pool must hold the true value plus this many others (the smallest pool is a sibling list).
MAX_PERTURBED = min(len(names) for names in _SIBLING_NAMES.values()) - 1


def _names(n_people: int, seed: int) -> list[str]:
    """n distinct full names; the first len(_FIRST_NAMES) share no first name and no surname."""
    rng = random.Random(f"unlearn-people-names:{seed}")
    firsts, surnames = list(_FIRST_NAMES), list(_SURNAMES)
    rng.shuffle(firsts)
    rng.shuffle(surnames)
    n_first = len(firsts)
    # Person i = (first a, surname a + b) for i = a + n_first * b: distinct pairs for every i < MAX.
    return [
        f"{firsts[i % n_first]} {surnames[(i + i // n_first) % len(surnames)]}"
        for i in range(n_people)
    ]


def _person(index: int, name: str, seed: int) -> Person:
    rng = random.Random(f"unlearn-people:{seed}:{index}")
    relation = rng.choice(sorted(_SIBLING_NAMES))
    return Person(
        index=index,
        name=name,
        birthplace=rng.choice(_TOWNS),
        birth_year=rng.choice(_BIRTH_YEARS),
        profession=rng.choice(_PROFESSIONS),
        instrument=rng.choice(_INSTRUMENTS),
        pet_kind=rng.choice(_PET_KINDS),
        pet_name=rng.choice(_PET_NAMES),
        colour=rng.choice(_COLOURS),
        employer=rng.choice(_EMPLOYERS),
        book=rng.choice(_BOOKS),
        sibling_relation=relation,
        sibling_name=rng.choice(_SIBLING_NAMES[relation]),
        favourite_food=rng.choice(_FOODS),
    )


def generate_people(n_people: int = 20, seed: int = 0) -> list[Person]:
    """`n_people` fictitious people with distinct names, reproducible from `seed`.

    Person i is the same whatever `n_people` is, so a larger request extends a smaller one.
    """
    if not 1 <= n_people <= MAX_PEOPLE:
        raise UnlearnError(
            f"n_people must be between 1 and {MAX_PEOPLE} (got {n_people}): the name lists "
            "cannot make more distinct people."
        )
    return [_person(i, name, seed) for i, name in enumerate(_names(n_people, seed))]


def _record(person: Person, attr: _Attribute, rng: random.Random, n_perturbed: int) -> dict:
    slots = asdict(person)
    value = slots[attr.field]
    question, paraphrased = rng.sample(attr.questions, 2)
    wrong = rng.sample([v for v in attr.pool(person) if v != value], n_perturbed)
    return {
        "id": f"person{person.index:02d}-{attr.key}",
        "question": question.format(**slots),
        # The answer is the bare fact: ROUGE then measures whether the fact is recalled, not
        # whether the model repeats the name and template words every answer shares.
        "answer": f"{value}.",
        "paraphrased_question": paraphrased.format(**slots),
        "paraphrased_answer": attr.paraphrase.format(**slots, value=value),
        "perturbed_answer": [attr.paraphrase.format(**slots, value=w) for w in wrong],
        "statement": attr.statement.format(**slots, value=value),
        "person": person.name,
    }


def people_qa(
    people: Sequence[Person], qa_per_person: int = 5, n_perturbed: int = 3, seed: int = 0
) -> list[dict]:
    """`qa_per_person` question-answer records per person, each about a different attribute.

    Which attributes, which phrasing is the question and which the paraphrase, and which wrong
    values are drawn depend only on (`seed`, person index), never on the other people passed.
    """
    if not 1 <= qa_per_person <= len(ATTRIBUTES):
        raise UnlearnError(
            f"qa_per_person must be between 1 and {len(ATTRIBUTES)} (got {qa_per_person}): "
            "each question is about a different attribute of the person."
        )
    if not 1 <= n_perturbed <= MAX_PERTURBED:
        raise UnlearnError(
            f"n_perturbed must be between 1 and {MAX_PERTURBED} (got {n_perturbed})."
        )
    records = []
    for person in people:
        rng = random.Random(f"unlearn-people-qa:{seed}:{person.index}")
        chosen = sorted(rng.sample(range(len(ATTRIBUTES)), qa_per_person))
        records += [_record(person, ATTRIBUTES[i], rng, n_perturbed) for i in chosen]
    return records


def build_people_benchmark(
    n_forget: int = 2,
    n_retain: int = 8,
    n_holdout: int = 2,
    qa_per_person: int = 5,
    n_perturbed: int = 3,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """The "forget", "retain" and "holdout" splits, each about its own group of people.

    The model is fine-tuned on forget + retain, then made to forget "forget"; "holdout" people are
    never trained on, so they are the non-members a membership-inference attack compares against.
    Defaults (12 people, 5 questions each) fit a few minutes of CPU fine-tuning on SmolLM2-135M.
    """
    if n_forget < 1 or n_retain < 0 or n_holdout < 0:
        raise UnlearnError(
            f"need n_forget >= 1 and n_retain, n_holdout >= 0 "
            f"(got {n_forget}, {n_retain}, {n_holdout})."
        )
    people = generate_people(n_forget + n_retain + n_holdout, seed)
    groups = {
        "forget": people[:n_forget],
        "retain": people[n_forget : n_forget + n_retain],
        "holdout": people[n_forget + n_retain :],
    }
    return {
        split: people_qa(group, qa_per_person, n_perturbed, seed) for split, group in groups.items()
    }
