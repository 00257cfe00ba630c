"""Tests of layout detection and normalization, on real public samples and hand-made fixtures."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from alignpipe.data.layouts import (
    LAYOUTS,
    Layout,
    RowError,
    detect_layout,
    normalize,
    resolve_layout,
)
from alignpipe.data.readers import read_rows
from alignpipe.data.records import FIELDS
from alignpipe.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "layouts"


@pytest.fixture
def shared_data(sample_data: Path):
    """A real sample from the shared data folder (conftest's ``sample_data``; see SOURCES.md)."""

    def path(relative: str) -> str:
        found = sample_data / relative
        if not found.exists():
            pytest.fail(f"{found} is missing; the real-data tests need the shared data folder")
        return str(found)

    return path


def load(path: str, layout_name: str | None = None, mapping=None):
    """Read, detect (or take) the layout, normalize; return the layout, records and errors.

    Records come with the line of their row; errors are grouped as {reason: [lines]}.
    """
    rows = list(read_rows(path))
    assert all(r.error is None for r in rows)
    layout = LAYOUTS[layout_name] if layout_name else detect_layout([r.data for r in rows[:20]])
    records, errors = [], defaultdict(list)
    for row in rows:
        try:
            records.extend((row.line, rec) for rec in normalize(row.data, layout, mapping))
        except RowError as err:
            errors[str(err)].append(row.line)
    return layout, records, dict(errors)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


# real data


def test_hh_rlhf_sample(shared_data):
    layout, records, errors = load(shared_data("hh_rlhf_harmless_base/sample.jsonl.gz"))

    assert layout.name == "hh_rlhf"
    assert len(records) == 1495
    # four transcripts end with an empty assistant turn; one chosen transcript has an extra turn
    assert errors == {
        "empty chosen response": [87, 517, 926, 1104],
        "chosen and rejected have different prompts": [1255],
    }
    line, first = records[0]
    assert line == 1
    assert list(first) == list(FIELDS["preference"])
    assert [m["role"] for m in first["prompt"]] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert first["prompt"][0] == user("what are some pranks with a pen i can do?")
    assert first["prompt"][1] == assistant("Are you looking for practical joke ideas?")
    assert first["prompt"][4] == user("okay some of these do not have anything to do with pens")
    assert first["chosen"] == [
        assistant(
            "No, sorry!  All of these involve a pen, the point is that you can get funny "
            "results by doing pranks with pens."
        )
    ]
    assert first["rejected"][0]["content"].startswith(
        "There are lots of funny things you can do with pens, here’s one example"
    )
    assert (first["margin"], first["annotator"], first["source"]) == (None, None, None)


def test_hh_rlhf_prompts_may_hold_two_assistant_turns_in_a_row(shared_data):
    # line 764 of the sample: Human, Assistant, Assistant, Human, Assistant
    _, records, _ = load(shared_data("hh_rlhf_harmless_base/sample.jsonl.gz"), "hh_rlhf")
    record = dict(records)[764]

    assert [m["role"] for m in record["prompt"]] == ["user", "assistant", "assistant", "user"]


def test_orca_openai_preference_sample(shared_data):
    layout, records, errors = load(shared_data("orca_dpo_pairs_openai_format/validation.jsonl"))

    assert layout.name == "openai_preference"
    assert (len(records), errors) == (284, {})
    first = records[0][1]
    assert [m["role"] for m in first["prompt"]] == ["system", "user"]
    assert first["prompt"][0]["content"].startswith("You are an AI assistant. User will you give")
    assert first["prompt"][1]["content"].startswith("MM. Georges Colombier, Samad Seyidov")
    assert len(first["chosen"]) == 1 and len(first["rejected"]) == 1
    assert first["chosen"][0]["role"] == "assistant"
    assert first["chosen"][0]["content"].startswith("Step 1: Identify the names and phrases")
    assert first["rejected"][0]["content"].startswith("Sure, I'd be happy to help!")


def test_alpaca_sample(shared_data):
    layout, records, errors = load(shared_data("alpaca_llamafactory/alpaca_en_demo.json"))

    assert layout.name == "alpaca"
    assert (len(records), errors) == (999, {})
    assert records[0][1]["messages"][0] == user("Describe a process of making crepes.")
    assert records[0][1]["messages"][1]["content"].startswith("Making crepes is an easy")
    assert records[0][1]["task"] is None
    # item 6 has an input, which follows the instruction after a blank line
    line, sixth = records[5]
    assert line == 6
    assert sixth["messages"][0] == user(
        "Given the parameters of a triangle, find out its perimeter.\n\n"
        "Side 1 = 4\nSide 2 = 6\nSide 3 = 8"
    )
    assert sixth["messages"][1]["content"].endswith("the perimeter of the triangle is 18 units.")


def test_gsm8k_openai_chat_sample(shared_data):
    layout, records, errors = load(shared_data("gsm8k_chat_messages/chat_train.jsonl"))

    assert layout.name == "openai_chat"
    assert (len(records), errors) == (449, {})
    assert all(
        [m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for _, r in records
    )
    messages = records[0][1]["messages"]
    assert messages[0] == system("Reply user's question as accurately as possible.")
    assert messages[1]["content"].startswith("Natalia sold clips to 48 of her friends in April")
    # the leading space of the answer is kept: we strip nothing meaningful
    assert messages[2]["content"].startswith(" Natalia sold 48/2 = <<48/2=24>>24 clips in May.")
    assert messages[2]["content"].endswith("#### 72!!!")


def test_sts_benchmark_sample(shared_data):
    layout, records, errors = load(shared_data("sts_benchmark/sts-train.csv"))

    assert layout.name == "sts"
    assert (len(records), errors) == (5749, {})
    assert records[0] == (
        1,
        {
            "anchor": "A plane is taking off.",
            "positive": "An air plane is taking off.",
            "negative": None,
            "score": 5.0,
        },
    )
    assert records[1][1]["score"] == 3.8
    # line 5553 is the first with 9 fields (two license columns follow the sentences)
    line, ninth = records[5552]
    assert line == 5553
    assert ninth["anchor"] == "Driver backs into stroller with child, drives off"
    assert ninth["positive"] == "Driver backs into mom, stroller with child then drives off"
    assert ninth["score"] == 4.0
    assert all(0.0 <= r["score"] <= 5.0 for _, r in records)


# hand-made fixtures, one per layout


def test_trl_standard_fixture():
    layout, records, errors = load(str(FIXTURES / "trl_standard.jsonl"))

    assert (layout.name, layout.shape, errors) == ("trl_standard", "preference", {})
    assert [rec for _, rec in records] == [
        {
            "prompt": [user("What is 2 + 2?")],
            "chosen": [assistant("4")],
            "rejected": [assistant("5")],
            "margin": None,
            "annotator": None,
            "source": None,
        },
        {
            "prompt": [user("Name a primary colour.")],
            "chosen": [assistant("Red.")],
            "rejected": [assistant("Purple.")],
            "margin": 2.5,
            "annotator": None,
            "source": None,
        },
        {
            "prompt": [user("Translate 'chat' from French.")],
            "chosen": [assistant("Cat.")],
            "rejected": [assistant("Chat.")],
            "margin": None,
            "annotator": None,
            "source": "fr-quiz",
        },
    ]


def test_trl_conversational_fixture_with_an_implicit_prompt():
    layout, records, errors = load(str(FIXTURES / "trl_conversational.jsonl"))

    assert (layout.name, errors) == ("trl_conversational", {})
    first, second, third = (rec for _, rec in records)
    assert first["prompt"] == [system("Be brief."), user("Capital of France?")]
    assert (first["chosen"], first["rejected"]) == ([assistant("Paris.")], [assistant("Lyon.")])
    assert second["prompt"] == [
        user("Hi"),
        assistant("Hello! How can I help?"),
        user("Tell me a colour."),
    ]
    assert second["chosen"] == [assistant("Blue.")]
    # no prompt column: the shared user turn becomes the prompt
    assert third["prompt"] == [user("Is water wet?")]
    assert third["chosen"] == [assistant("Yes, to the touch.")]
    assert third["rejected"] == [assistant("No.")]


def test_sharegpt_fixture():
    layout, records, errors = load(str(FIXTURES / "sharegpt.json"))

    assert (layout.name, layout.shape, errors) == ("sharegpt", "conversation", {})
    assert [rec["messages"] for _, rec in records] == [
        [system("You are terse."), user("2+3?"), assistant("5")],
        [user("Hi"), assistant("Hello."), user("Bye"), assistant("Goodbye.")],
        [system("Answer in French."), user("Thanks"), assistant("Merci.")],
    ]


def test_sharegpt_preference_fixture():
    layout, records, errors = load(str(FIXTURES / "sharegpt_preference.json"))

    assert (layout.name, errors) == ("sharegpt_preference", {})
    first, second, third = (rec for _, rec in records)
    assert first["prompt"] == [user("Best first move in chess?")]
    assert first["chosen"] == [assistant("1. e4 is a strong start.")]
    assert first["rejected"] == [assistant("Move the king.")]
    assert second["prompt"] == [system("Be kind."), user("I failed my exam.")]
    assert second["chosen"] == [assistant("I'm sorry. You can retake it.")]
    assert third["prompt"] == [user("Hi"), assistant("Hello!"), user("Joke?")]
    assert third["rejected"] == [assistant("No.")]


def test_dolly_fixture():
    layout, records, errors = load(str(FIXTURES / "dolly.jsonl"))

    assert (layout.name, errors) == ("dolly", {})
    assert [rec["messages"] for _, rec in records] == [
        [
            user(
                "When was the Eiffel Tower finished?\n\n"
                "The Eiffel Tower was completed in 1889 for the World's Fair."
            ),
            assistant("In 1889."),
        ],
        [user("Give me three fruits."), assistant("Apple, pear, plum.")],
        [
            user("Summarise: cats sleep a lot.\n\nCats sleep 12 to 16 hours a day."),
            assistant("Cats sleep most of the day."),
        ],
    ]


def test_feedback_fixture():
    layout, records, errors = load(str(FIXTURES / "feedback.jsonl"))

    assert (layout.name, layout.shape, errors) == ("feedback", "feedback", {})
    assert [rec for _, rec in records] == [
        {
            "prompt": [user("Is the sky blue?")],
            "completion": [assistant("Yes, on a clear day.")],
            "label": True,
        },
        {
            "prompt": [user("Is the sky blue?")],
            "completion": [assistant("Only at night.")],
            "label": False,
        },
        {"prompt": [user("Say hi")], "completion": [assistant("Hi!")], "label": True},
        {"prompt": [user("2+2?")], "completion": [assistant("5")], "label": False},
    ]


def test_qa_pair_fixture_with_stack_exchange_names():
    layout, records, errors = load(str(FIXTURES / "qa_pair.jsonl"))

    assert (layout.name, errors) == ("qa_pair", {})
    assert [(r["prompt"], r["chosen"], r["rejected"]) for _, r in records] == [
        (
            [user("How do I reverse a list in Python?")],
            [assistant("Use lst[::-1] or lst.reverse().")],
            [assistant("You cannot.")],
        ),
        (
            [user("What does git stash do?")],
            [assistant("It shelves uncommitted changes.")],
            [assistant("It deletes your repo.")],
        ),
        (
            [user("How to exit vim?")],
            [assistant("Type :q and press Enter.")],
            [assistant("Unplug the computer.")],
        ),
    ]


def test_qa_pair_with_mapped_column_names():
    mapping = {"prompt": "query", "chosen": "good", "rejected": "bad"}
    _, records, errors = load(str(FIXTURES / "qa_custom.csv"), "qa_pair", mapping)

    assert errors == {}
    assert [(r["prompt"][0]["content"], r["chosen"], r["rejected"]) for _, r in records] == [
        ("Largest planet?", [assistant("Jupiter.")], [assistant("Pluto.")]),
        ("Boiling point of water, at sea level?", [assistant("100 °C.")], [assistant("50 °C.")]),
        ("Author of Hamlet?", [assistant("Shakespeare.")], [assistant("Dickens.")]),
    ]
    # the same mapping lets detection see the columns as a TRL standard pair
    rows = [r.data for r in read_rows(str(FIXTURES / "qa_custom.csv"))]
    assert detect_layout(rows, mapping).name == "trl_standard"


def test_text_pair_fixture_with_an_empty_negative_cell():
    layout, records, errors = load(str(FIXTURES / "text_pair.csv"))

    assert (layout.name, layout.shape, errors) == ("text_pair", "text_pair", {})
    assert [rec for _, rec in records] == [
        {
            "anchor": "A dog runs in a park.",
            "positive": "A dog is running outside.",
            "negative": "A cat sleeps on a sofa.",
            "score": None,
        },
        {
            "anchor": "How old is the universe?",
            "positive": "The universe is about 13.8 billion years old.",
            "negative": None,
            "score": None,
        },
        {
            "anchor": "Pasta recipe",
            "positive": "Boil pasta and add sauce.",
            "negative": "Change a car tyre.",
            "score": None,
        },
    ]


def test_columns_fixture_mapped_to_preference():
    mapping = {
        "prompt": "question_text",
        "chosen": "answer_a",
        "rejected": "answer_b",
        "annotator": "rater",
    }
    _, records, errors = load(str(FIXTURES / "columns.csv"), "columns", mapping)

    assert errors == {}
    assert [rec for _, rec in records][1] == {
        "prompt": [user("Speed of light?")],
        "chosen": [assistant("About 300000 km/s.")],
        "rejected": [assistant("About 300 km/h.")],
        "margin": None,
        "annotator": "bob",
        "source": None,
    }
    assert [rec["annotator"] for _, rec in records] == ["ann", "bob", "ann"]
    assert resolve_layout(LAYOUTS["columns"], mapping).shape == "preference"


def test_columns_mapped_to_feedback_text_pair_and_conversation():
    feedback = normalize(
        {"q": "Hi?", "a": "Hello.", "ok": "TRUE"},
        LAYOUTS["columns"],
        {"prompt": "q", "completion": "a", "label": "ok"},
    )
    pair = normalize(
        {"s1": "a cat", "s2": "a kitten", "sim": "4.5"},
        LAYOUTS["columns"],
        {"anchor": "s1", "positive": "s2", "score": "sim"},
    )
    chat = normalize(
        {"sys": "Be nice.", "q": "Hi", "a": "Hello"},
        LAYOUTS["columns"],
        {"system": "sys", "user": "q", "assistant": "a"},
    )

    assert feedback == [
        {"prompt": [user("Hi?")], "completion": [assistant("Hello.")], "label": True}
    ]
    assert pair == [{"anchor": "a cat", "positive": "a kitten", "negative": None, "score": 4.5}]
    assert chat == [
        {"messages": [system("Be nice."), user("Hi"), assistant("Hello")], "task": None}
    ]


def test_sts_named_columns_keep_the_score_scale():
    rows = [
        {"sentence1": "A man sings.", "sentence2": "A man is singing.", "score": "4.6"},
        {"anchor": "A girl runs.", "positive": "A boy sleeps.", "score": 0},
    ]

    layout = detect_layout(rows)

    assert layout.name == "sts"
    assert normalize(rows[0], layout) == [
        {"anchor": "A man sings.", "positive": "A man is singing.", "negative": None, "score": 4.6}
    ]
    assert normalize(rows[1], layout)[0]["score"] == 0.0


def test_alpaca_with_system_and_history():
    row = {
        "instruction": "And in French?",
        "input": "",
        "output": "Bonjour.",
        "system": "You translate.",
        "history": [["Say hello in Spanish.", "Hola."]],
    }

    assert normalize(row, LAYOUTS["alpaca"]) == [
        {
            "messages": [
                system("You translate."),
                user("Say hello in Spanish."),
                assistant("Hola."),
                user("And in French?"),
                assistant("Bonjour."),
            ],
            "task": None,
        }
    ]


# detection


def test_detection_prefers_the_most_specific_layout():
    sharegpt_pref = {
        "conversations": [{"from": "human", "value": "q"}],
        "chosen": {"from": "gpt", "value": "a"},
        "rejected": {"from": "gpt", "value": "b"},
    }
    hh = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}
    dolly = {"instruction": "i", "context": "", "response": "r", "output": "o"}

    assert detect_layout([sharegpt_pref]).name == "sharegpt_preference"
    assert detect_layout([hh]).name == "hh_rlhf"
    assert detect_layout([dolly]).name == "dolly"
    assert detect_layout([{"anchor": "a", "positive": "p", "score": 1}]).name == "sts"
    assert detect_layout([{"anchor": "a", "positive": "p"}]).name == "text_pair"


def test_detection_follows_the_majority_of_rows():
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    odd = {"prompt": "p", "chosen": 3, "rejected": "r"}

    assert detect_layout([odd, good, good]).name == "trl_standard"


def test_unrecognisable_layout_is_a_data_error():
    with pytest.raises(DataError) as caught:
        detect_layout([{"foo": 1, "bar": "x"}, {"foo": 2, "bar": "y"}])

    message = str(caught.value)
    assert message.startswith("cannot recognise the layout of rows with keys foo, bar; ")
    assert "--format openai_preference|" in message
    assert message.endswith("or map columns with --map FIELD=COLUMN")


def test_detection_needs_rows():
    with pytest.raises(DataError, match="no parsed rows"):
        detect_layout([])


def test_every_layout_but_columns_has_a_normalizer_and_a_shape():
    assert all(isinstance(layout, Layout) for layout in LAYOUTS.values())
    assert [name for name, layout in LAYOUTS.items() if layout.shape is None] == ["columns"]
    for name, layout in LAYOUTS.items():
        assert name == layout.name and layout.fields and layout.description


# row errors, per layout

HH_PROMPT = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke"

ROW_ERRORS = [
    (
        "hh_rlhf",
        {"chosen": HH_PROMPT + "\n\nAssistant: ok", "rejected": "\n\nHuman: bye\n\nAssistant: no"},
        "chosen and rejected have different prompts",
    ),
    (
        "hh_rlhf",
        {"chosen": HH_PROMPT + "\n\nAssistant:", "rejected": HH_PROMPT + "\n\nAssistant: no"},
        "empty chosen response",
    ),
    (
        "hh_rlhf",
        {"chosen": "Human: hi\n\nAssistant: a", "rejected": "Human: hi\n\nAssistant: b"},
        "chosen transcript must start with '\\n\\nHuman:'",
    ),
    (
        "hh_rlhf",
        {"chosen": HH_PROMPT, "rejected": HH_PROMPT},
        "chosen transcript must end with an assistant turn",
    ),
    (
        "hh_rlhf",
        {"chosen": ["x"], "rejected": "y"},
        "chosen must be a transcript string, got a list",
    ),
    ("trl_standard", {"prompt": "p", "chosen": "  \n", "rejected": "r"}, "empty chosen response"),
    ("trl_standard", {"prompt": "", "chosen": "c", "rejected": "r"}, "empty prompt"),
    ("trl_standard", {"chosen": "c", "rejected": "r"}, "missing column 'prompt'"),
    ("trl_standard", {"prompt": "p", "chosen": "c"}, "missing column 'rejected'"),
    (
        "trl_standard",
        {"prompt": "p", "chosen": 7, "rejected": "r"},
        "chosen must be a non-empty list of messages, got a number",
    ),
    (
        "trl_conversational",
        {
            "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "chosen": [{"role": "assistant", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "r"}],
        },
        "prompt must end with a user turn, got assistant",
    ),
    (
        "trl_conversational",
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "user", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "r"}],
        },
        "chosen must hold only assistant messages",
    ),
    (
        "trl_conversational",
        {
            "prompt": [{"role": "tool", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "r"}],
        },
        "prompt[0] has role 'tool'; expected one of system, user, assistant",
    ),
    (
        "trl_conversational",
        {
            "chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}],
        },
        "chosen and rejected share no prompt ending with a user turn",
    ),
    (
        "openai_preference",
        {"input": "q", "preferred_output": [], "non_preferred_output": []},
        "input must be an object with messages",
    ),
    (
        "openai_preference",
        {
            "input": {"messages": [{"role": "user", "content": "q"}]},
            "preferred_output": [{"role": "assistant", "content": ""}],
            "non_preferred_output": [{"role": "assistant", "content": "b"}],
        },
        "empty chosen response",
    ),
    (
        "sharegpt",
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
        "unknown role 'bot' in conversations[1]; expected human, gpt or system "
        "(or user, assistant)",
    ),
    (
        "sharegpt",
        {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
        "conversations must start with a user turn (after an optional system message)",
    ),
    (
        "sharegpt",
        {"conversations": [{"from": "human", "value": "q"}]},
        "conversations must end with an assistant turn to be trainable",
    ),
    (
        "sharegpt_preference",
        {
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            "chosen": {"from": "gpt", "value": "c"},
            "rejected": {"from": "gpt", "value": "r"},
        },
        "conversations must end with a human turn (the prompt of the pair)",
    ),
    (
        "sharegpt_preference",
        {
            "conversations": [{"from": "human", "value": "q"}],
            "chosen": {"from": "human", "value": "c"},
            "rejected": {"from": "gpt", "value": "r"},
        },
        "chosen must hold only assistant messages",
    ),
    (
        "openai_chat",
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "a"},
            ]
        },
        "messages has a system message at turn 1; only the first may be",
    ),
    (
        "openai_chat",
        {"messages": [{"role": "user", "content": "q"}]},
        "messages must end with an assistant turn to be trainable",
    ),
    (
        "openai_chat",
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
        "messages[1] content must be a string, got null",
    ),
    (
        "openai_chat",
        {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]},
        "messages[0] (user) has empty content",
    ),
    ("alpaca", {"instruction": "i", "input": "", "output": " "}, "empty output"),
    ("alpaca", {"instruction": 5, "output": "o"}, "instruction must be a string, got a number"),
    (
        "alpaca",
        {"instruction": "i", "output": "o", "history": [["only one"]]},
        "history[0] must be an [instruction, response] pair",
    ),
    ("dolly", {"instruction": "i", "context": "c"}, "missing column 'response'"),
    (
        "feedback",
        {"prompt": "p", "completion": "c", "label": "maybe"},
        "label must be true or false (or 1/0), got 'maybe'",
    ),
    (
        "feedback",
        {"prompt": "p", "completion": "c", "label": 2},
        "label must be true or false (or 1/0), got 2",
    ),
    ("feedback", {"prompt": "p", "completion": "c"}, "missing column 'label'"),
    (
        "feedback",
        {"messages": [{"role": "user", "content": "q"}], "label": True},
        "messages must end with the assistant turn that the label judges",
    ),
    ("feedback", {"prompt": "p", "completion": "", "label": True}, "empty completion response"),
    ("qa_pair", {"question": "q", "response_j": "a"}, "missing column 'response_k'"),
    (
        "sts",
        {"columns": ["g", "f", "2012", "1", "n/a", "a", "b"]},
        "score must be a number, got 'n/a'",
    ),
    (
        "sts",
        {"columns": ["g", "f", "2012", "1", "3.0"]},
        "STS row has 5 fields; expected at least 7 (genre, file, year, id, score, sentence1, "
        "sentence2)",
    ),
    ("sts", {"sentence1": "a", "sentence2": " ", "score": 1}, "empty sentence2"),
    (
        "sts",
        {"sentence1": "a", "sentence2": "b", "score": "nan"},
        "score must be a finite number, got 'nan'",
    ),
    ("text_pair", {"anchor": "", "positive": "p"}, "empty anchor"),
    ("text_pair", {"anchor": "a", "positive": ["p"]}, "positive must be a string, got a list"),
]


@pytest.mark.parametrize(("name", "row", "reason"), ROW_ERRORS)
def test_row_errors(name, row, reason):
    with pytest.raises(RowError) as caught:
        normalize(row, LAYOUTS[name])

    assert str(caught.value) == reason


def test_row_errors_cover_every_layout():
    assert {name for name, _, _ in ROW_ERRORS} == set(LAYOUTS) - {"columns"}


def test_missing_mapped_column_names_the_users_column():
    mapping = {"prompt": "query", "chosen": "good", "rejected": "bad"}

    with pytest.raises(RowError, match="missing column 'bad'"):
        normalize({"query": "q", "good": "g"}, LAYOUTS["qa_pair"], mapping)
    with pytest.raises(RowError, match="label must be true or false"):
        normalize(
            {"q": "p", "a": "c", "y": "yes please"},
            LAYOUTS["columns"],
            {"prompt": "q", "completion": "a", "label": "y"},
        )


def test_empty_system_message_is_dropped_not_fatal():
    row = {
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]
    }

    assert normalize(row, LAYOUTS["openai_chat"])[0]["messages"] == [user("q"), assistant("a")]


# mapping errors are about the configuration, not a row


def test_mapping_a_field_the_layout_lacks_is_a_data_error():
    with pytest.raises(DataError, match="the alpaca layout has no field 'answer'; its fields are"):
        normalize({"instruction": "i", "output": "o"}, LAYOUTS["alpaca"], {"answer": "output"})


@pytest.mark.parametrize(
    ("mapping", "match"),
    [
        ({}, "the columns layout needs a mapping that forms a shape, got none"),
        ({"prompt": "q", "chosen": "a"}, "needs a mapping that forms a shape"),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "score": "s"},
            "score do not belong to preference records",
        ),
    ],
)
def test_columns_mapping_that_forms_no_shape_is_a_data_error(mapping, match):
    with pytest.raises(DataError, match=match):
        resolve_layout(LAYOUTS["columns"], mapping)
