"""The built-in demo data: fictitious people (forget/retain/holdout) and world facts."""

from __future__ import annotations

import pytest

from unlearn.errors import UnlearnError
from unlearn.eval.suites.general_knowledge import general_knowledge_qa
from unlearn.eval.suites.people import (
    ATTRIBUTES,
    MAX_PERTURBED,
    build_people_benchmark,
    generate_people,
    people_qa,
)

PEOPLE_KEYS = {
    "id",
    "question",
    "answer",
    "paraphrased_question",
    "statement",
    "paraphrased_answer",
    "perturbed_answer",
    "person",
}
SPLITS = ("forget", "retain", "holdout")


def _all(bench: dict[str, list[dict]]) -> list[dict]:
    return [record for split in SPLITS for record in bench[split]]


def test_same_seed_same_output_and_different_seed_differs():
    assert build_people_benchmark(seed=0) == build_people_benchmark(seed=0)
    assert generate_people(20, seed=3) == generate_people(20, seed=3)
    assert build_people_benchmark(seed=0) != build_people_benchmark(seed=1)
    assert [p.name for p in generate_people(12, 0)] != [p.name for p in generate_people(12, 1)]


def test_more_people_extends_fewer():
    assert generate_people(20, seed=5)[:7] == generate_people(7, seed=5)


def test_default_sizes():
    bench = build_people_benchmark()
    assert set(bench) == set(SPLITS)
    assert [len(bench[s]) for s in SPLITS] == [2 * 5, 8 * 5, 2 * 5]
    assert len(generate_people()) == 20


def test_splits_are_about_disjoint_people():
    bench = build_people_benchmark(n_forget=3, n_retain=5, n_holdout=4, qa_per_person=4)
    people = {split: {r["person"] for r in bench[split]} for split in SPLITS}
    assert [len(people[s]) for s in SPLITS] == [3, 5, 4]
    assert not people["forget"] & people["retain"]
    assert not people["holdout"] & (people["forget"] | people["retain"])


def test_names_are_distinct_even_for_many_people():
    names = [p.name for p in generate_people(300, seed=2)]
    assert len(set(names)) == 300
    first = [p.name.split()[0] for p in generate_people(40, seed=2)]
    assert len(set(first)) == 40


def test_records_are_complete():
    for record in _all(build_people_benchmark(qa_per_person=len(ATTRIBUTES), n_perturbed=5)):
        assert set(record) == PEOPLE_KEYS
        for key in PEOPLE_KEYS - {"perturbed_answer"}:
            assert isinstance(record[key], str) and record[key].strip(), (key, record)
        assert record["person"] in record["question"]
        assert record["answer"].rstrip(".").strip('"') in record["paraphrased_answer"]
        assert record["question"] != record["paraphrased_question"]
        assert record["answer"] != record["paraphrased_answer"]
        assert len(record["answer"].split()) <= 16
        # the statement (a second training form) states the same fact in other words
        assert record["answer"].rstrip(".").strip('"') in record["statement"]
        assert record["statement"] not in (record["paraphrased_answer"], record["answer"])
        assert record["person"] in record["statement"]


def test_perturbed_answers_are_distinct_wrong_versions():
    for record in _all(build_people_benchmark(qa_per_person=len(ATTRIBUTES), n_perturbed=4)):
        wrong = record["perturbed_answer"]
        assert len(wrong) == 4
        assert len(set(wrong)) == 4
        assert record["answer"] not in wrong
        assert record["paraphrased_answer"] not in wrong
        assert all(w.strip() for w in wrong)


def test_perturbed_share_the_paraphrase_sentence():
    record = build_people_benchmark()["forget"][0]
    prefix = record["paraphrased_answer"].split(record["person"])[0]
    assert all(w.startswith(prefix + record["person"]) for w in record["perturbed_answer"])


def test_ids_unique_and_stable():
    bench = build_people_benchmark(seed=0)
    ids = [r["id"] for r in _all(bench)]
    assert len(ids) == len(set(ids))
    assert all(i.startswith("person") for i in ids)
    # The same person's records do not depend on who else is generated alongside.
    people = generate_people(12, seed=0)
    assert people_qa(people[:1]) == people_qa(people)[:5]
    assert bench["forget"][:5] == people_qa(people[:1])


@pytest.mark.parametrize(
    "kwargs",
    [{"n_forget": 0}, {"n_retain": -1}, {"qa_per_person": 0}, {"qa_per_person": 11},
     {"n_perturbed": 0}, {"n_perturbed": MAX_PERTURBED + 1}],
)  # fmt: skip
def test_bad_sizes_raise_unlearn_error(kwargs):
    with pytest.raises(UnlearnError):
        build_people_benchmark(**kwargs)


def test_general_knowledge_items_are_well_formed():
    items = general_knowledge_qa()
    assert len(items) >= 25
    assert len({item["id"] for item in items}) == len(items)
    for item in items:
        assert set(item) == {"id", "question", "answer", "perturbed_answer"}
        assert item["question"].endswith("?")
        assert item["answer"].strip()
        wrong = item["perturbed_answer"]
        assert len(wrong) == 3 and len(set(wrong)) == 3
        assert item["answer"] not in wrong
    assert general_knowledge_qa() == items  # fresh copies, same content
    assert general_knowledge_qa() is not items
