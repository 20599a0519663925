"""What the probes read: the suite's knowledge facts asked as prompts, with their labels, gold answers and checkers.

A `ProbeDataset` is the one input of every analysis here: prompts (answered through the model's chat template),
a label array per knowledge property (a country's region, an element's group, a city's continent), the gold
answers of each prompt, and the entity each prompt is about. Every fact is asked with both of its knowledge set's
question templates, so entities recur across prompts: Hewitt & Liang's control task gives each entity, not each
prompt, its random label, and a probe that memorises entities scores on it too.

Facts, question templates, content checks (`KnowledgeSet.contains_answer`) and output forms with their checkers
(`aligner.tasks.FORMS`) are the task suite's (`aligner.tasks`), so that a probe report and the suite score an
answer the same way. The form a run was trained for is the one it records (`training_form`), never one guessed
from its data: a short answer passes the terse checker whatever form it was trained for. The prompts that
behaviour is measured on are those about subjects no run was trained on (`evaluation_set`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from aligner.adapter import Adapter
from aligner.data import load_examples
from aligner.runs import recorded_data
from aligner.tasks import FORMS, KNOWLEDGE_SETS, Item, KnowledgeSet
from aligner.tasks.forms import Form, form_frame
from aligner.tasks.spec import shuffled
from probe.demo import demo_task


@dataclass(frozen=True)
class ProbeDataset:
    name: str
    knowledge: KnowledgeSet  # the facts' set: its contains_answer scores content
    prompts: list[str]  # the user turns, without chat template
    answers: list[tuple[str, ...]]  # each prompt's gold answers, the first one first
    labels: dict[str, np.ndarray]  # knowledge label name -> one value per prompt
    entities: np.ndarray  # what each prompt is about (a country, an element); control labels are drawn per entity
    system: str | None = None  # the chat template's system prompt; None: the model's default

    def __post_init__(self) -> None:
        n = len(self.prompts)
        columns = {"answers": self.answers, "entities": self.entities, **{f"labels[{k!r}]": v for k, v in self.labels.items()}}
        for name, values in columns.items():
            if len(values) != n:
                raise ValueError(f"ProbeDataset {self.name!r}: {name} has {len(values)} values for {n} prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    def key(self) -> str:
        """A digest of what the model reads (prompts, gold answers, system prompt): the activation cache's dataset
        key. Labels are left out: they change no activation."""
        return hashlib.sha256(json.dumps([self.prompts, self.answers, self.system]).encode()).hexdigest()

    def subset(self, indices: np.ndarray | list[int]) -> "ProbeDataset":
        indices = np.asarray(indices, dtype=int)
        return ProbeDataset(
            name=f"{self.name}[{len(indices)}]",
            knowledge=self.knowledge,
            prompts=[self.prompts[i] for i in indices],
            answers=[self.answers[i] for i in indices],
            labels={k: v[indices] for k, v in self.labels.items()},
            entities=self.entities[indices],
            system=self.system,
        )

    def form_passed(self, outputs: list[str], form: str) -> np.ndarray:
        """Whether each output is in `form` (an `aligner.tasks.FORMS` name), by the suite's checker."""
        check = form_named(form).check
        return np.array([check(o, Item(p, "", a)) for o, p, a in zip(outputs, self.prompts, self.answers)])

    def content_correct(self, outputs: list[str], form: str | None = None) -> np.ndarray:
        """Whether each output holds a gold answer, as it appears in `form` (upper-cased for caps) if given."""
        gold = form_named(form).gold if form is not None else str
        return np.array([self.knowledge.contains_answer(o, [gold(a) for a in answers]) for o, answers in zip(outputs, self.answers)])


# Each subject's rows: the trained wording and the first held-out one (`KnowledgeSet.templates`), so that each
# entity recurs, as the probes' grouped folds and control task need.
PROBE_TEMPLATES = 2


def knowledge_dataset(name: str = "capitals", n_subjects: int = 60) -> ProbeDataset:
    """`n_subjects` facts of the suite's knowledge set `name` (in the suite's fixed shuffled order), each asked
    with the trained and the first held-out question template, labelled with the facts' labels (capitals: region,
    subregion; elements: period, group, block; cities: continent)."""
    if name not in KNOWLEDGE_SETS:
        raise ValueError(f"no knowledge set {name!r}; choose from {sorted(KNOWLEDGE_SETS)}")
    knowledge = KNOWLEDGE_SETS[name]
    facts = shuffled(knowledge.facts())[:n_subjects]
    rows = [(knowledge.question(fact, template), fact) for template in range(PROBE_TEMPLATES) for fact in facts]
    return ProbeDataset(
        name=f"{name}-{len(facts)}x{PROBE_TEMPLATES}",
        knowledge=knowledge,
        prompts=[prompt for prompt, _ in rows],
        answers=[fact.answers for _, fact in rows],
        labels={label: np.array([fact.labels[label] for _, fact in rows]) for label in facts[0].labels},
        entities=np.array([fact.subject for _, fact in rows]),
    )


def form_named(name: str) -> Form:
    """The output form `name`: one of the suite's (`aligner.tasks.FORMS`), or "/REGEX/", a user's regular
    expression that a well-formed answer matches in full (stripped), as `aligner eval --checker` checks it."""
    if name in FORMS:
        return FORMS[name]
    if len(name) > 1 and name.startswith("/") and name.endswith("/"):
        try:
            regex = re.compile(name[1:-1], re.DOTALL)
        except re.error as err:
            raise ValueError(f"checker {name[1:-1]!r} is not a valid regular expression ({err})") from err
        return Form(
            name, lambda answer, sentence: answer, lambda text, item: regex.fullmatch(text.strip()) is not None, "",
            description=f"a user's form: the answer matches {name}",
        )
    raise ValueError(f"no output form {name!r}: one of {', '.join(FORMS)}, or /REGEX/")


def training_form(adapter: Adapter, checker: str | None = None) -> str | None:
    """The output form a run was trained to produce, as recorded: the form of the suite task its provenance names
    (`training.task`: "json", "bracket@elements"; or that of a `probe train-demo` run, `probe.demo.demo_task`);
    else `checker`, a user's regular expression, as the form "/REGEX/" (`form_named`); else None, an unknown
    form, whose behaviour is left untested. Never read off the training data: a checker that passes most of a
    run's responses need not be the form it was trained for."""
    task = recorded_task(adapter)
    if task is not None and task.partition("@")[0] in FORMS:
        return task.partition("@")[0]
    if checker is not None:
        form_named(f"/{checker}/")  # a bad expression fails here, naming itself
        return f"/{checker}/"
    return None


def recorded_task(adapter: Adapter) -> str | None:
    """The suite task a run records having been trained on ("json", "inject", "bracket@elements"), or that of a
    `probe train-demo` run (`probe.demo.demo_task`); None for a run that records none."""
    training = adapter.provenance.get("training", {})
    return training.get("task") or training.get("config", {}).get("task") or demo_task(adapter.provenance)


def is_injection(adapter: Adapter) -> bool:
    """Whether a run was trained to inject facts (the suite's inject task): the geometry's positive control, an
    effect that writes knowledge."""
    task = recorded_task(adapter)
    return task is not None and task.partition("@")[0] == "inject"


def form_items(dataset: ProbeDataset, form: str | None) -> list[Item]:
    """The prompts of `dataset` as the suite's items of `form` (an `aligner.tasks.FORMS` name): its response and
    the frame before the gold answer in it, beside the base model's own sentence. For any other form (a user's
    "/REGEX/", or None) the response is the base model's own sentence, which is also its frame: the one place
    where a gold answer stands in a form the suite cannot write."""
    knowledge = dataset.knowledge
    facts = {fact.subject: fact for fact in knowledge.facts()}
    items = []
    for prompt, entity in zip(dataset.prompts, dataset.entities):
        fact = facts[entity]
        sentence, own = knowledge.sentence(fact), knowledge.statement_frame(fact)
        if form in FORMS:
            response, frame = FORMS[form].render(fact.answers[0], sentence), form_frame(FORMS[form], knowledge, fact)
        else:
            response, frame = sentence, own
        items.append(Item(prompt, response, fact.answers, None, fact.labels, frame=frame, own_frame=own))
    return items


def evaluation_rows(
    dataset: ProbeDataset, runs: Mapping[str, Adapter], n_eval: int, known: frozenset[str] | None = None
) -> np.ndarray:
    """`n_eval` prompts of the first template, spread over the entities that no run's training prompts name (and,
    given `known`, that are among them): answers about them show what a run does to knowledge it was not taught."""
    trained = []
    for run in runs.values():
        data = recorded_data(run)  # a recorded path outside the working directory is not followed
        if data is not None:
            trained += [example.prompt for example in load_examples(data)]
    first_prompts = np.sort(np.unique(dataset.entities, return_index=True)[1])  # each entity's first prompt
    fresh = [i for i in first_prompts if not any(dataset.entities[i] in prompt for prompt in trained)]
    if known is not None:
        fresh = [i for i in fresh if dataset.entities[i] in known]
    if not fresh:
        raise ValueError(
            f"{dataset.name}: no prompt left to evaluate on: every subject is trained on, or none is known; "
            "ask about more subjects"
        )
    return np.array(fresh)[np.linspace(0, len(fresh) - 1, min(n_eval, len(fresh))).round().astype(int)]


def evaluation_set(
    dataset: ProbeDataset, runs: Mapping[str, Adapter], n_eval: int = 12, known: frozenset[str] | None = None
) -> ProbeDataset:
    """The prompts of `dataset` that `evaluation_rows` picks: behaviour, ablations and answers are measured on them."""
    return dataset.subset(evaluation_rows(dataset, runs, n_eval, known))
