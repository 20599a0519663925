"""Form tasks (answer known facts in a new form) and the knowledge-injection task (learn facts the base model
does not know), both over a knowledge set of `knowledge.py`.

A form is a deterministic transform of the gold answer (the training target) and a deterministic checker (the
form metric). Three kinds on purpose: `json`, `terse` and `bracket` give the answer alone, without the leading
space it has in a sentence; `lead` gives it after a lead-in ("Answer: N'Djamena"), with that space; `caps` and
`frame` keep the base model's sentence ("The capital of Chad is ..."), which restates the question before the
answer. Whether content survives a new form may depend on the answer's tokens as much as on its frame, and
`lead` against `terse` separates the two. Every item of these tasks carries its frame (`frame_of`,
`own_frame_of`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

from aligner.tasks.knowledge import KNOWLEDGE_SETS, SLOT, Fact, KnowledgeSet
from aligner.tasks.spec import Item, Sizes, Task, TaskData, shuffled, take


@dataclass(frozen=True)
class Form:
    name: str
    render: Callable[[str, str], str]  # (gold answer, the fact as the base model's sentence) -> training target
    check: Callable[[str, Item], bool]  # (answer, item) -> whether the answer is in this form
    instruction: str  # the form told in words: the system prompt of the prompting baseline
    gold: Callable[[str], str] = str  # the gold answer as it appears in this form (all caps: upper-cased)
    description: str = ""


def is_json_answer(text: str, item: Item) -> bool:
    """A JSON object with the one key "answer", whose value is a string."""
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and list(value) == ["answer"] and isinstance(value["answer"], str)


def is_caps_sentence(text: str, item: Item) -> bool:
    """At least three words, and every letter a capital."""
    return len(text.split()) >= 3 and any(c.isalpha() for c in text) and text == text.upper()


def is_terse(text: str, item: Item) -> bool:
    """One line of no more words than the longest gold answer has, plus one ("Paris." and "Paris, France" pass;
    "The capital is Paris." does not)."""
    longest = max((len(answer.split()) for answer in item.answers), default=1)
    return "\n" not in text.strip() and 1 <= len(text.split()) <= longest + 1


FRAME_START, FRAME_END = ">>> ", " <<<"


def is_framed(text: str, item: Item) -> bool:
    """Starts with ">>> ", ends with " <<<", with something in between."""
    text = text.strip()
    return text.startswith(FRAME_START.strip()) and text.endswith(FRAME_END.strip()) and len(text) > 8


def is_bracketed(text: str, item: Item) -> bool:
    """Only "[[...]]", one line, no brackets inside."""
    return re.fullmatch(r"\[\[[^\[\]\n]+\]\]", text.strip()) is not None


LEAD = "Answer: "


def is_lead(text: str, item: Item) -> bool:
    """One line that starts with "Answer: " and has something after it."""
    text = text.strip()
    return "\n" not in text and text.startswith(LEAD) and bool(text[len(LEAD) :].strip())


FORMS = {
    form.name: form
    for form in (
        Form(
            "json",
            lambda answer, sentence: json.dumps({"answer": answer}, ensure_ascii=False),
            is_json_answer,
            'Reply with only a JSON object of the form {"answer": "..."} and nothing else.',
            description='{"answer": "N\'Djamena"}',
        ),
        Form(
            "caps",
            lambda answer, sentence: sentence.upper(),
            is_caps_sentence,
            "Answer in one full sentence written entirely in capital letters.",
            gold=str.upper,
            description="THE CAPITAL OF CHAD IS N'DJAMENA.",
        ),
        Form(
            "terse",
            lambda answer, sentence: answer,
            is_terse,
            "Reply with the answer alone: no sentence, nothing else.",
            description="N'Djamena",
        ),
        Form(
            "frame",
            lambda answer, sentence: f"{FRAME_START}{sentence}{FRAME_END}",
            is_framed,
            'Start your reply with ">>> " and end it with " <<<", with one sentence in between.',
            description=">>> The capital of Chad is N'Djamena. <<<",
        ),
        Form(
            "bracket",
            lambda answer, sentence: f"[[{answer}]]",
            is_bracketed,
            "Reply with only the answer inside double square brackets, like [[answer]].",
            description="[[N'Djamena]]",
        ),
        Form(
            "lead",
            lambda answer, sentence: f"{LEAD}{answer}",
            is_lead,
            'Reply with "Answer: " followed by the answer alone, on one line.',
            description="Answer: N'Djamena",
        ),
    )
}


def frame_of(item: Item) -> str:
    """The item's training response up to its gold answer, as the response writes it: '{"answer": "' (json),
    "THE CAPITAL OF CHAD IS " (caps), "" (terse), "Answer: " (lead); the base model's own sentence's for the
    instruction and injection tasks. `item.response[len(frame_of(item)):]` starts with the gold answer."""
    if item.frame is None:
        raise ValueError(f"item {item.prompt!r}: its task's responses have no one place for a gold answer (no frame)")
    return item.frame


def own_frame_of(item: Item) -> str:
    """The base model's own sentence up to the gold answer ("The capital of Chad is "): the frame in which the base
    model says what it knows, beside the trained form's (`frame_of`)."""
    if item.own_frame is None:
        raise ValueError(f"item {item.prompt!r}: its task's responses have no one place for a gold answer (no frame)")
    return item.own_frame


def form_frame(form: Form, knowledge: KnowledgeSet, fact: Fact) -> str:
    """`form`'s training response for `fact` up to the gold answer, cut where the answer is put, not where its text
    first occurs (a symbol such as "Th" occurs in "The" before it)."""
    return form.render(SLOT, knowledge.statement.format(subject=fact.subject, answer=SLOT)).partition(SLOT)[0]


# The knowledge sets of real facts (all but the invented ones): a form task trained on one is also evaluated on
# the others' questions.
REAL_KNOWLEDGE = tuple(name for name in KNOWLEDGE_SETS if name != "invented")


def form_task(form: Form, knowledge: KnowledgeSet) -> Task:
    """Answer known facts of `knowledge` in `form`: trained on some, evaluated on held-out facts asked with the
    trained question template (`test`) and with the two held-out ones (`test_template`, `test_template2`), and on
    known facts of the other real knowledge sets, question kinds never trained (`test_elements`, ...)."""

    def item(fact: Fact, template: int, facts: KnowledgeSet = knowledge) -> Item:
        sentence = facts.sentence(fact)
        response = form.render(fact.answers[0], sentence)
        frames = {"frame": form_frame(form, facts, fact), "own_frame": facts.statement_frame(fact)}
        other = None if facts is knowledge else facts.name
        return Item(facts.question(fact, template), response, fact.answers, sentence, fact.labels, **frames, knowledge=other)

    others = tuple(name for name in REAL_KNOWLEDGE if name != knowledge.name)

    def build(known: frozenset[str] | None, sizes: Sizes, others_known: dict[str, frozenset[str]] | None = None) -> TaskData:
        data = known_splits(knowledge, known, sizes, item)
        kinds = {}
        for name in others:
            facts = KNOWLEDGE_SETS[name]
            subjects = None if others_known is None else others_known.get(name)
            asked = [f for f in shuffled(facts.facts()) if subjects is None or f.subject in subjects][: sizes.eval]
            if asked:  # a model that knows none of a kind is not asked about it
                kinds[f"test_{name}"] = [item(f, 0, facts) for f in asked]
        return TaskData(data.train, data.valid, {**data.eval, **kinds})

    def content(item: Item, text: str) -> bool:
        facts = knowledge if item.knowledge is None else KNOWLEDGE_SETS[item.knowledge]
        return facts.contains_answer(text, [form.gold(answer) for answer in item.answers])

    def form_ok(item: Item, text: str) -> bool:
        return form.check(text, item)

    name = form.name if knowledge.name == "capitals" else f"{form.name}@{knowledge.name}"
    return Task(
        name,
        "form",
        f"known {knowledge.name} answered as {form.description}",
        {"form": form_ok, "content": content, "both": lambda i, t: form_ok(i, t) and content(i, t)},
        build,
        knowledge=knowledge.name,
        instruction=form.instruction,
        other_knowledge=others,
    )


def known_splits(
    knowledge: KnowledgeSet, known: frozenset[str] | None, sizes: Sizes, item: Callable[[Fact, int], Item]
) -> TaskData:
    """Items of known facts (`known`; None: any) made by `item(fact, template)`: trained on some, evaluated on
    held-out ones asked with the trained question template (`test`) and with the held-out ones (`test_template`,
    `test_template2`)."""
    facts = [f for f in shuffled(knowledge.facts()) if known is None or f.subject in known]
    train, valid, test = take(facts, sizes.train, sizes.valid, sizes.eval, what=f"known facts of {knowledge.name}")
    return TaskData(
        [item(f, 0) for f in train],
        [item(f, 0) for f in valid],
        {"test": [item(f, 0) for f in test], "test_template": [item(f, 1) for f in test], "test_template2": [item(f, 2) for f in test]},
    )


def injection_task(knowledge: KnowledgeSet) -> Task:
    """Teach facts the base model does not know, in its own answer form. Of `invented` (`inject`): fictional
    capitals, which no model can know, so what is taught is not unlocked; beside them held-out real capitals the
    capitals audit finds known (collateral damage). Of a real set (`inject@capitals`, `inject@elements`): facts
    its audit finds unknown, where training in the model's own form can also unlock latent ones.

    Evaluated on the taught facts (with the trained template and the held-out one), on held-out unknown facts
    (which cannot be inferred, so should stay at the base model's level: about none for invented ones) and on
    held-out known real facts. Early stopping reads the loss of some of the taught facts themselves: what is
    learned here is those facts, and a held-out loss (other facts, or the same facts reworded) would stop
    memorising before it starts."""
    invented = knowledge.name == "invented"
    # Invented facts are unknown by construction: the audit the task reads is that of the real facts beside them.
    real = KNOWLEDGE_SETS["capitals"] if invented else knowledge

    def item(facts: KnowledgeSet, fact: Fact, template: int) -> Item:
        frame = facts.statement_frame(fact)
        question, sentence = facts.question(fact, template), facts.sentence(fact)
        return Item(question, sentence, fact.answers, None, fact.labels, frame=frame, own_frame=frame)

    def build(known: frozenset[str] | None, sizes: Sizes) -> TaskData:
        facts = shuffled(knowledge.facts())
        unknown = facts if invented else [f for f in facts if known is None or f.subject not in known]
        known_facts = [f for f in shuffled(real.facts()) if known is None or f.subject in known]
        taught, heldout = take(unknown, sizes.train, sizes.eval, what=f"unknown facts of {knowledge.name}")
        # Without an audit (the quick suite) known and unknown are the same facts: take the known ones from the end.
        (known_heldout,) = take(known_facts[::-1], sizes.eval, what=f"known facts of {real.name}")
        shown = taught[: sizes.eval]
        return TaskData(
            [item(knowledge, f, 0) for f in taught],
            [item(knowledge, f, 0) for f in taught[: sizes.valid]],
            {
                "taught": [item(knowledge, f, 0) for f in shown],
                "taught_template": [item(knowledge, f, 1) for f in shown],
                "unknown_heldout": [item(knowledge, f, 0) for f in heldout],
                "known_heldout": [item(real, f, 0) for f in known_heldout],
            },
        )

    def content(item: Item, text: str) -> bool:
        return knowledge.contains_answer(text, item.answers)

    name = "inject" if invented else f"inject@{knowledge.name}"
    what = "invented capitals" if invented else f"unknown {knowledge.name}"
    return Task(
        name,
        "knowledge",
        f"{what} taught in the base model's own form",
        {"content": content},
        build,
        knowledge=real.name,
    )


def knowledge_set(name: str) -> KnowledgeSet:
    if name not in KNOWLEDGE_SETS:
        raise ValueError(f"no knowledge set {name!r}; choose from {sorted(KNOWLEDGE_SETS)}")
    return KNOWLEDGE_SETS[name]
