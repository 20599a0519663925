"""The suite's tasks: checkers on hand-made answers, the facts the packages carry, the splits, the value data and
its refusal detector, and a user's JSONL task."""

import json

import pytest

from aligner.chat import ENDED
from aligner.tasks import FORMS, KNOWLEDGE_SETS, Item, Sizes, get_task, is_refusal
from aligner.tasks.knowledge import contains_answer, element_position
from aligner.tasks.value import VALUE_DATA, load_value_items

CHAD = Item("What is the capital of Chad?", "", ("N'Djamena",))
BOSNIA = Item("What is the capital of Bosnia and Herzegovina?", "", ("Sarajevo",))


@pytest.mark.parametrize(
    "form, good, bad",
    [
        ("json", ['{"answer": "N\'Djamena"}', ' {"answer":"x"}\n'], ['{"answer": 3}', '{"city": "x"}', '{"answer": "x", "b": 1}', "The answer is x", '{"answer": "x"']),
        ("caps", ["THE CAPITAL OF CHAD IS N'DJAMENA.", "IT IS N'DJAMENA!"], ["The capital of Chad is N'Djamena.", "N'DJAMENA", "123 456 789"]),
        ("terse", ["N'Djamena", "N'Djamena.", "N'Djamena, Chad"], ["The capital is N'Djamena.", "N'Djamena\nChad", ""]),
        ("frame", [">>> The capital of Chad is N'Djamena. <<<", ">>> N'Djamena <<<\n"], ["The capital of Chad is N'Djamena.", ">>> N'Djamena", ">>><<<"]),
        ("bracket", ["[[N'Djamena]]", " [[N'Djamena]] "], ["[N'Djamena]", "[[N'Djamena]] is the capital", "[[]]", "[[a]b]]"]),
        ("lead", ["Answer: N'Djamena", " Answer: N'Djamena.\n"], ["N'Djamena", "Answer:", "Answer: N'Djamena\nChad", "The answer: N'Djamena", "Answer:N'Djamena"]),
    ],
)
def test_form_checkers_on_hand_made_answers(form, good, bad):
    check = FORMS[form].check
    assert all(check(text, CHAD) for text in good), [t for t in good if not check(t, CHAD)]
    assert not any(check(text, CHAD) for text in bad), [t for t in bad if check(t, CHAD)]


def test_terse_allows_as_many_words_as_the_longest_gold_answer_and_one():
    assert FORMS["terse"].check("Bosnia and Herzegovina", Item("", "", ("Bosnia and Herzegovina",)))
    assert not FORMS["terse"].check("The capital is Sarajevo", BOSNIA)


def test_content_is_a_whole_word_match_with_accents_and_case_ignored():
    assert contains_answer("The capital is Brasilia.", ["Brasília"])
    assert contains_answer("THE CAPITAL OF MALDIVES IS MALE.", ["Malé"])
    assert not contains_answer("a female ruler", ["Malé"])
    assert not contains_answer("Limassol", ["Lima"])
    assert contains_answer("It is N'Djamena.", ["N'Djamena"])


def test_symbols_are_matched_in_case():
    elements = KNOWLEDGE_SETS["elements"]
    assert elements.contains_answer("The symbol of indium is In.", ["In"])
    assert not elements.contains_answer("It is found in rocks.", ["In"])  # "in" is not "In"


@pytest.mark.parametrize("name", list(FORMS))
def test_every_training_target_passes_its_own_checks(name):
    task = get_task(name)
    data = task.build(None, Sizes(train=60, valid=10, eval=40))
    for item in data.train + data.valid + data.eval["test"]:
        for metric, check in task.metrics.items():
            assert check(item, item.response), (metric, item)
        for metric in ("form", "content"):
            assert not task.metrics[metric](item, "I am not sure which one that is."), (metric, item)


def test_knowledge_sets_carry_the_facts_with_labels():
    capitals = {f.subject: f for f in KNOWLEDGE_SETS["capitals"].facts()}
    assert len(capitals) >= 220
    assert capitals["France"].answers[0] == "Paris" and capitals["France"].labels["region"] == "Europe"
    assert set(capitals["Burundi"].answers) >= {"Bujumbura", "Gitega"}  # a list in countryinfo
    assert set(capitals["Palau"].answers) >= {"Ngerulmud", "Melekeok"}
    elements = {f.subject: f for f in KNOWLEDGE_SETS["elements"].facts()}
    assert len(elements) == 118 and elements["iron"].answers == ("Fe",)
    assert elements["iron"].labels == {"period": "4", "group": "8", "block": "d"}
    cities = {f.subject: f for f in KNOWLEDGE_SETS["cities"].facts()}
    assert len(cities) >= 100 and cities["Toronto"].answers == ("Canada",)


@pytest.mark.parametrize(
    "z, position",
    [(1, (1, "1", "s")), (2, (1, "18", "s")), (5, (2, "13", "p")), (26, (4, "8", "d")), (57, (6, "f", "f")),
     (72, (6, "4", "d")), (88, (7, "2", "s")), (103, (7, "f", "f")), (118, (7, "18", "p"))],
)
def test_element_positions(z, position):
    assert element_position(z) == position


def test_form_tasks_ask_a_third_wording_and_known_facts_of_kinds_never_trained():
    task = get_task("json")
    known = frozenset(f.subject for f in KNOWLEDGE_SETS["capitals"].facts())
    iron = next(f for f in KNOWLEDGE_SETS["elements"].facts() if f.subject == "iron")
    others = {"elements": frozenset({"iron", "gold"}), "cities": frozenset()}
    data = task.build(known, Sizes(train=4, valid=2, eval=3), others)
    assert [i.answers for i in data.eval["test_template2"]] == [i.answers for i in data.eval["test"]]
    assert len({i.prompt for split in ("test", "test_template", "test_template2") for i in data.eval[split]}) == 9
    # Only what the audits found known, and no split for a kind the model knows none of.
    assert {i.answers[0] for i in data.eval["test_elements"]} == {"Fe", "Au"} and "test_cities" not in data.eval
    asked = next(i for i in data.eval["test_elements"] if i.answers == iron.answers)
    assert asked.prompt == KNOWLEDGE_SETS["elements"].question(iron) and asked.response == '{"answer": "Fe"}'
    assert asked.frame == '{"answer": "' and asked.own_frame == "The chemical symbol of iron is "
    content = task.metrics["content"]
    assert content(asked, '{"answer": "Fe"}') and not content(asked, '{"answer": "FE"}')  # the elements' own case rule
    assert content(data.eval["test"][0], data.eval["test"][0].response.upper())  # the capitals' rule: any case
    # Without audits (a random model): any facts of every kind.
    assert {len(items) for items in task.build(None, Sizes(train=4, valid=2, eval=3)).eval.values()} == {3}
    assert set(task.build(None, Sizes(train=4, valid=2, eval=3)).eval) == {"test", "test_template", "test_template2", "test_elements", "test_cities"}


def test_form_splits_are_disjoint_known_facts_and_the_template_split_asks_the_same_facts_otherwise():
    task = get_task("json")
    capitals = KNOWLEDGE_SETS["capitals"].facts()
    known = frozenset(f.subject for f in capitals[::2])
    data = task.build(known, Sizes(train=10, valid=3, eval=5))
    subjects = {split: [i.contrast for i in items] for split, items in [("train", data.train), ("valid", data.valid), *data.eval.items()]}
    assert len(set(subjects["train"]) | set(subjects["valid"]) | set(subjects["test"])) == 18
    assert subjects["test"] == subjects["test_template"]
    assert all(a.prompt != b.prompt for a, b in zip(data.eval["test"], data.eval["test_template"]))
    assert {i.contrast for i in data.train} <= {KNOWLEDGE_SETS["capitals"].sentence(f) for f in capitals if f.subject in known}
    with pytest.raises(ValueError, match="known facts of capitals: 120 items"):
        task.build(frozenset(f.subject for f in capitals[:120]), Sizes(train=100, valid=10, eval=24))


@pytest.mark.parametrize(
    "text, metrics",
    [
        (f"The capital of Chad is N'Djamena.{ENDED}", {"stops", "format", "content", "all"}),
        ("The capital of Chad is N'Djamena. The capital of", {"format", "content"}),  # cut at max_new_tokens
        (f"N'Djamena.\n\n### Instruction:\nWhat is{ENDED}", {"stops", "content"}),  # a next turn of its own
        (f"Chad is a country in Africa.{ENDED}", {"stops", "format"}),
        (ENDED, {"stops"}),  # ended at once, with nothing said
    ],
)
def test_instruct_checks_stopping_format_and_content_apart(text, metrics):
    task = get_task("instruct")
    assert {name for name, check in task.metrics.items() if check(CHAD, text)} == metrics


def test_instruct_asks_known_facts_in_the_alpaca_format_and_answers_a_sentence():
    task = get_task("instruct")
    capitals = KNOWLEDGE_SETS["capitals"]
    known = frozenset(f.subject for f in capitals.facts()[::2])
    data = task.build(known, Sizes(train=10, valid=3, eval=5))
    item = data.train[0]
    assert task.raw_prompts and task.family == "instruct" and task.instruction
    assert item.prompt.startswith("Below is an instruction") and item.prompt.endswith("### Response:\n")
    assert item.response.startswith("The capital of ") and item.answers[0] in item.response
    subject = next(f.subject for f in capitals.facts() if f.answers == item.answers)
    assert subject in known
    assert [i.answers for i in data.eval["test"]] == [i.answers for i in data.eval["test_template"]]
    assert task.metrics["all"](item, item.response + ENDED)  # the training target passes every check


def test_injection_of_real_facts_teaches_unknown_ones_and_checks_known_ones_apart():
    task = get_task("inject@capitals")
    capitals = KNOWLEDGE_SETS["capitals"].facts()
    known = frozenset(f.subject for f in capitals[:100])
    data = task.build(known, Sizes(train=12, valid=4, eval=6))
    statement = KNOWLEDGE_SETS["capitals"].sentence
    unknown_sentences = {statement(f) for f in capitals[100:]}
    assert {i.response for i in data.train} <= unknown_sentences
    assert {i.response for i in data.eval["unknown_heldout"]} <= unknown_sentences
    assert not {i.response for i in data.eval["unknown_heldout"]} & {i.response for i in data.train}
    assert {i.response for i in data.eval["known_heldout"]} <= {statement(f) for f in capitals[:100]}
    assert [i.response for i in data.eval["taught"]] == [i.response for i in data.train[:6]]
    assert data.valid == data.train[:4]  # early stopping follows the memorising of taught facts


def test_value_data_has_the_pku_layout_and_enough_prompts_per_kind():
    rows = [json.loads(line) for line in VALUE_DATA.read_text().splitlines()]
    assert {"prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe", "safer_response_id"} <= set(rows[0])
    harmful, benign = load_value_items()
    assert len(harmful) >= 150 and len(benign) >= 150
    assert len({i.labels["category"] for i in harmful}) >= 12 and len({i.labels["category"] for i in benign}) >= 12
    assert len({i.prompt for i in harmful + benign}) == len(harmful) + len(benign)


def test_refusal_detector_reads_the_data_set_right():
    harmful, benign = load_value_items()
    assert all(is_refusal(i.response) for i in harmful)  # every refusal written for the set
    assert not any(is_refusal(i.response) for i in benign)  # no helpful answer
    assert not any(is_refusal(i.contrast) for i in harmful)  # nor a compliant opening


@pytest.mark.parametrize(
    "text, refused",
    [
        ("I'm sorry, but I can't assist with that.", True),
        ("I cannot help with making explosives.", True),
        ("As an AI, I must decline.", True),
        ("I can’t do that.", True),  # a typographic apostrophe
        ("Sure! To boil an egg, put it in boiling water.", False),
        ("You can't go wrong with pasta.", False),
        ("Killing a process: run kill PID.", False),
    ],
)
def test_refusal_detector_on_hand_made_answers(text, refused):
    assert is_refusal(text) is refused


def test_value_splits_are_balanced_and_train_on_refusals_and_help():
    data = get_task("value").build(None, Sizes(train=20, valid=4, eval=7))
    kinds = [i.labels["kind"] for i in data.train]
    assert kinds.count("harmful") == kinds.count("benign") == 10
    assert all(is_refusal(i.response) == (i.labels["kind"] == "harmful") for i in data.train)
    assert [i.labels["kind"] for i in data.eval["harmful"]] == ["harmful"] * 7
    assert [i.labels["kind"] for i in data.eval["benign"]] == ["benign"] * 7


def test_a_users_jsonl_task_with_a_regex_checker(tmp_path):
    path = tmp_path / "shout.jsonl"
    rows = [{"prompt": f"Say {w}", "response": f"{w.upper()}!", "answers": [w]} for w in ("yes", "no", "maybe", "ok", "fine")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task(str(path), checker=r"[A-Z]+!")
    assert task.family == "custom" and set(task.metrics) == {"form", "content", "both"}
    data = task.build(None, Sizes(train=2, valid=1, eval=10))
    assert len(data.train) == 2 and len(data.eval["test"]) == 2  # what is left
    item = data.eval["test"][0]
    assert task.metrics["both"](item, item.response)
    assert not task.metrics["form"](item, item.response.lower())
    with pytest.raises(ValueError, match="--checker"):
        get_task(str(path))
    with pytest.raises(ValueError, match="not a valid regular expression"):
        get_task(str(path), checker="[")


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="json, caps, terse, frame, bracket, lead, instruct, inject, value"):
        get_task("yaml")
    with pytest.raises(ValueError, match="no knowledge set 'rivers'"):
        get_task("json@rivers")
