"""Tests for reducing multi-annotator exports (votes, rankings, scores) to preference pairs."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest

from alignpipe.data.annotations import (
    aggregate,
    detect_annotation_layout,
    fleiss_kappa,
    kendall_tau,
    krippendorff_alpha_interval,
)
from alignpipe.errors import ConfigError, DataError


def vote(item, choice, annotator, a="A", b="B", prompt="Q?"):
    return {
        "item_id": item,
        "prompt": prompt,
        "response_a": a,
        "response_b": b,
        "choice": choice,
        "annotator": annotator,
    }


def ranked(item, ranking, annotator, responses=("R0", "R1", "R2"), prompt="Q?"):
    return {
        "item_id": item,
        "prompt": prompt,
        "responses": list(responses),
        "ranking": ranking,
        "annotator": annotator,
    }


def scored(item, scores, annotator, responses=("R0", "R1", "R2"), prompt="Q?"):
    return {
        "item_id": item,
        "prompt": prompt,
        "responses": list(responses),
        "scores": scores,
        "annotator": annotator,
    }


def numbered(rows):
    return list(enumerate(rows, start=1))


def text(messages):
    assert len(messages) == 1
    return messages[0]["content"]


def assert_lines_covered(result, rows):
    """Every input line is behind a candidate or dropped, never both, never lost."""
    kept = {line for c in result.candidates for line in c.lines}
    dropped = [line for d in result.dropped for line in d.lines]
    assert len(dropped) == len(set(dropped))
    assert kept.isdisjoint(dropped)
    assert kept | set(dropped) == {line for line, _ in rows}


# -- detection ------------------------------------------------------------------------------


def test_detect_layout_by_keys():
    assert detect_annotation_layout([vote("1", "a", "x")]) == "votes"
    assert detect_annotation_layout([ranked("1", [0, 1, 2], "x")]) == "rankings"
    assert detect_annotation_layout([scored("1", [1, 2, 3], "x")]) == "scores"
    # a preference file and an SFT file are not annotation exports
    assert detect_annotation_layout([{"prompt": "p", "chosen": "c", "rejected": "r"}]) is None
    assert detect_annotation_layout([{"messages": []}]) is None
    assert detect_annotation_layout([]) is None
    # one stray vote row among other rows does not make an export
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 3 + [vote("1", "a", "x")]
    assert detect_annotation_layout(rows) is None
    # a majority does, even with some malformed rows
    assert detect_annotation_layout([vote("1", "a", "x"), {"oops": 1}, vote("2", "b", "x")]) == (
        "votes"
    )


def test_detect_layout_ambiguous_rows_name_the_fix():
    row = ranked("1", [0, 1, 2], "x") | {"scores": [1, 2, 3]}
    with pytest.raises(DataError, match="pass the layout explicitly"):
        detect_annotation_layout([row])


# -- votes ----------------------------------------------------------------------------------


def test_votes_majority_ties_and_single_judgements():
    rows = numbered(
        [
            vote("q1", "a", "ann1"),  # 1
            vote("q1", "a", "ann2"),  # 2
            vote("q1", "b", "ann3"),  # 3
            vote("q2", "a", "ann1"),  # 4: q2 splits 1-1 -> tie
            vote("q2", "b", "ann2"),  # 5
            vote("q3", "tie", "ann1"),  # 6: q3 all tie -> tie
            vote("q3", "TIE", "ann2"),  # 7
            vote("q4", "b", "ann1"),  # 8: one judgement
            vote("q5", "a", "ann1"),  # 9: a=1, tie=2 -> a wins, margin 1/3
            vote("q5", "tie", "ann2"),  # 10
            vote("q5", "tie", "ann3"),  # 11
        ]
    )
    result = aggregate(rows, "votes", source="export.jsonl")

    assert [c.lines for c in result.candidates] == [[1, 2, 3], [8], [9, 10, 11]]
    first, single, weak = (c.record for c in result.candidates)
    assert first == {
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "A"}],
        "rejected": [{"role": "assistant", "content": "B"}],
        "margin": pytest.approx(1 / 3),  # (2 - 1) / 3
        "annotator": "majority",
        "source": "export.jsonl",
    }
    assert (text(single["chosen"]), text(single["rejected"])) == ("B", "A")
    assert single["margin"] == 1.0
    assert single["annotator"] == "ann1"
    assert text(weak["chosen"]) == "A"
    assert weak["margin"] == pytest.approx(1 / 3)  # (1 - 0) / 3: tie votes lower the margin

    assert [(d.item_id, d.lines, d.reason) for d in result.dropped] == [
        ("q2", [4, 5], "tie: 1 a, 1 b, 0 tie"),
        ("q3", [6, 7], "tie: 0 a, 0 b, 2 tie"),
    ]
    stats = {k: v for k, v in result.stats.items() if k != "agreement"}
    assert stats == {
        "judgements": 11,
        "malformed": 0,
        "items": 5,
        "pairs": 3,
        "ties": 2,
        "tied_items": 2,
        "underjudged_items": 0,
        "annotators": 3,
    }
    assert_lines_covered(result, rows)


def test_votes_with_swapped_positions_are_mirrored():
    rows = numbered(
        [
            vote("q1", "a", "ann1", a="A", b="B"),
            vote("q1", "b", "ann2", a="B", b="A"),  # also prefers A
            vote("q1", "b", "ann3", a="A", b="B"),
        ]
    )
    result = aggregate(rows, "votes")
    [candidate] = result.candidates
    assert text(candidate.record["chosen"]) == "A"
    assert candidate.record["margin"] == pytest.approx(1 / 3)
    # counted as a, a, b per item: two of three annotator pairs disagree
    assert result.stats["agreement"]["raw_agreement"] == pytest.approx(1 / 3)


def test_votes_message_lists_are_accepted_as_is():
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
    ]
    chosen = [{"role": "assistant", "content": "Hello."}]
    rows = numbered([vote("q1", "a", "ann1", a=chosen, b="Go away.", prompt=prompt)])
    [candidate] = aggregate(rows, "votes").candidates
    assert candidate.record["prompt"] == prompt
    assert candidate.record["chosen"] == chosen
    assert candidate.record["rejected"] == [{"role": "assistant", "content": "Go away."}]


def test_votes_malformed_rows_are_dropped_with_reasons():
    good = vote("q1", "a", "ann1")
    no_choice = {k: v for k, v in vote("q1", "a", "ann2").items() if k != "choice"}
    rows = numbered(
        [
            good,  # 1
            no_choice,  # 2
            vote("q1", "maybe", "ann3"),  # 3
            vote("q1", "b", "ann4", prompt="Other?"),  # 4
            vote("q1", "b", "ann5", b="C"),  # 5
            vote("q1", "b", "ann1"),  # 6: ann1 judged q1 already
            vote("q2", "a", "ann1", a="Same", b="Same"),  # 7
            ["not", "an", "object"],  # 8
            vote("", "a", "ann1"),  # 9
            vote("q3", "a", "ann1", prompt=[{"role": "assistant", "content": "x"}]),  # 10
            vote("q3", "a", "ann1", b=[{"role": "user", "content": "x"}]),  # 11
            vote("q3", "a", "ann1", prompt="   "),  # 12
        ]
    )
    result = aggregate(rows, "votes")
    reasons = {d.lines[0]: (d.item_id, d.reason) for d in result.dropped}
    assert reasons == {
        2: ("q1", "missing key 'choice'"),
        3: ("q1", "choice 'maybe' is not one of a, b, tie"),
        4: ("q1", "prompt differs from the first judgement of item 'q1' (line 1)"),
        5: ("q1", "responses differ from the first judgement of item 'q1' (line 1)"),
        6: ("q1", "annotator 'ann1' already judged item 'q1' at line 1"),
        7: ("q2", "response_a and response_b are identical"),
        8: (None, "row is a list, not an object"),
        9: (None, "item_id '' is not a usable id"),
        10: ("q3", "prompt must end with a user message"),
        11: ("q3", "response_b has a message with role 'user'"),
        12: ("q3", "prompt is empty"),
    }
    assert [c.lines for c in result.candidates] == [[1]]
    assert result.stats["malformed"] == 11
    assert result.stats["judgements"] == 12
    assert result.stats["items"] == 1
    assert_lines_covered(result, rows)


def test_min_judgements_drops_thin_items():
    rows = numbered([vote("q1", "a", "x"), vote("q1", "a", "y"), vote("q2", "b", "x")])
    result = aggregate(rows, "votes", min_judgements=2)
    assert [c.lines for c in result.candidates] == [[1, 2]]
    [dropped] = result.dropped
    assert (dropped.item_id, dropped.lines) == ("q2", [3])
    assert dropped.reason == "1 judgement(s), fewer than min_judgements=2"
    assert result.stats["underjudged_items"] == 1


def test_fleiss_kappa_by_hand_three_items_three_annotators():
    rows = numbered(
        [
            vote("i1", "a", "x"),
            vote("i1", "a", "y"),
            vote("i1", "a", "z"),
            vote("i2", "a", "x"),
            vote("i2", "a", "y"),
            vote("i2", "b", "z"),
            vote("i3", "b", "x"),
            vote("i3", "b", "y"),
            vote("i3", "tie", "z"),
        ]
    )
    # counts per item over (a, b, tie)
    table = [(3, 0, 0), (2, 1, 0), (0, 2, 1)]
    # per-item agreement P_i = sum c(c-1) / (n(n-1)) with n = 3
    p_items = [Fraction(sum(c * (c - 1) for c in row), 3 * 2) for row in table]
    assert p_items == [1, Fraction(1, 3), Fraction(1, 3)]
    p_bar = sum(p_items) / 3  # 5/9
    # category shares over all 9 ratings: a 5/9, b 3/9, tie 1/9
    shares = [Fraction(sum(row[k] for row in table), 9) for k in range(3)]
    p_e = sum(p * p for p in shares)  # 35/81
    kappa = (p_bar - p_e) / (1 - p_e)
    assert kappa == Fraction(5, 23)

    agreement = aggregate(rows, "votes").stats["agreement"]
    assert agreement["fleiss_kappa"] == pytest.approx(float(kappa))
    assert agreement["raw_agreement"] == pytest.approx(float(p_bar))
    assert agreement["items"] == 3


def test_fleiss_kappa_edge_cases():
    assert fleiss_kappa([(3, 0, 0), (2, 0, 0)]) is None  # everyone chose "a": undefined
    assert fleiss_kappa([(1, 0, 0)]) is None  # nobody judged twice
    assert fleiss_kappa([(2, 0, 0), (0, 2, 0)]) == pytest.approx(1.0)
    # perfect disagreement in pairs: P = 0, Pe = 1/2 -> kappa = -1
    assert fleiss_kappa([(1, 1, 0), (1, 1, 0)]) == pytest.approx(-1.0)


# -- rankings -------------------------------------------------------------------------------


def test_rankings_pairwise_majority_margin_and_kendall_tau():
    rows = numbered(
        [
            ranked("k1", [0, 1, 2], "x"),  # 1
            ranked("k1", [0, 2, 1], "y"),  # 2
            ranked("k1", [1, 0, 2], "z"),  # 3
            ranked("k2", [0, 1], "x", responses=("S0", "S1")),  # 4: split 1-1
            ranked("k2", [1, 0], "y", responses=("S0", "S1")),  # 5
        ]
    )
    result = aggregate(rows, "rankings")
    pairs = [
        (text(c.record["chosen"]), text(c.record["rejected"]), c.record["margin"])
        for c in result.candidates
    ]
    # (0,1): x and y rank R0 above R1, z does not -> 2-1; (0,2): all three; (1,2): x and z
    assert pairs == [
        ("R0", "R1", pytest.approx(1 / 3)),
        ("R0", "R2", 1.0),
        ("R1", "R2", pytest.approx(1 / 3)),
    ]
    assert all(c.lines == [1, 2, 3] for c in result.candidates)
    assert all(c.record["annotator"] == "majority" for c in result.candidates)
    [tied] = result.dropped
    assert (tied.item_id, tied.lines) == ("k2", [4, 5])
    assert tied.reason.startswith("tie")
    assert result.stats["ties"] == 1
    assert result.stats["tied_items"] == 1
    assert result.stats["pairs"] == 3

    # tau on k1: x~y concordant on (0,1),(0,2), discordant on (1,2) -> 1/3; x~z -> 1/3;
    # y~z concordant only on (0,2) -> -1/3. k2: reversed rankings -> -1. Mean over 4 pairs.
    expected = (Fraction(1, 3) + Fraction(1, 3) - Fraction(1, 3) - 1) / 4
    agreement = result.stats["agreement"]
    assert agreement["kendall_tau"] == pytest.approx(float(expected))
    assert agreement["items"] == 2
    assert_lines_covered(result, rows)


def test_rankings_partly_tied_item_keeps_its_decided_pairs():
    rows = numbered([ranked("k1", [0, 1, 2], "x"), ranked("k1", [1, 0, 2], "y")])
    result = aggregate(rows, "rankings")
    pairs = [(text(c.record["chosen"]), text(c.record["rejected"])) for c in result.candidates]
    assert pairs == [("R0", "R2"), ("R1", "R2")]  # (R0, R1) splits 1-1
    assert result.dropped == []
    assert result.stats["ties"] == 1
    assert result.stats["tied_items"] == 0


def test_rankings_malformed_rows():
    rows = numbered(
        [
            ranked("k1", [0, 1, 2], "x"),
            ranked("k1", [0, 0, 1], "y"),
            ranked("k1", [0, 1], "z"),
            ranked("k1", [True, 0, 2], "w"),
            ranked("k1", [2, 1, 0], "v", responses=("R0", "R1", "R9")),
            ranked("k2", [0], "x", responses=("only",)),
            ranked("k3", [0, 1, 2], "x", responses=("R0", "R1", "R0")),
        ]
    )
    result = aggregate(rows, "rankings")
    assert [d.reason for d in result.dropped] == [
        "ranking [0, 0, 1] is not a permutation of 0..2",
        "ranking [0, 1] is not a permutation of 0..2",
        "ranking [True, 0, 2] is not a permutation of 0..2",
        "responses differ from the first judgement of item 'k1' (line 1)",
        "responses must be a list of at least two responses",
        "responses 0 and 2 are identical",
    ]
    assert len(result.candidates) == 3  # k1 from its single valid judgement
    assert all(c.record["annotator"] == "x" for c in result.candidates)
    assert_lines_covered(result, rows)


def test_kendall_tau_extremes():
    assert kendall_tau([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0
    assert kendall_tau([0, 1, 2, 3], [3, 2, 1, 0]) == -1.0
    # one swapped neighbour among 6 pairs: (5 - 1) / 6
    assert kendall_tau([0, 1, 2, 3], [1, 0, 2, 3]) == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        kendall_tau([0, 1], [0, 2])


# -- scores ---------------------------------------------------------------------------------


def test_scores_mean_gap_pairs():
    rows = numbered(
        [
            scored("s1", [5, 3, 1], "x"),  # means 4.5, 3.0, 1.5
            scored("s1", [4, 3, 2], "y"),
            scored("s2", [3, 3], "x", responses=("T0", "T1")),  # means 3.0, 3.5
            scored("s2", [3, 4], "y", responses=("T0", "T1")),
        ]
    )
    result = aggregate(rows, "scores")
    pairs = [
        (text(c.record["chosen"]), text(c.record["rejected"]), c.record["margin"])
        for c in result.candidates
    ]
    assert pairs == [("R0", "R1", 1.5), ("R0", "R2", 3.0), ("R1", "R2", 1.5)]
    [dropped] = result.dropped
    assert (dropped.item_id, dropped.lines) == ("s2", [3, 4])
    assert dropped.reason == "no pair of mean scores differs by min_score_gap=1.0"
    assert_lines_covered(result, rows)

    wide = aggregate(rows, "scores", min_score_gap=2.0)
    assert [(text(c.record["chosen"]), c.record["margin"]) for c in wide.candidates] == [
        ("R0", 3.0)
    ]
    assert wide.stats["ties"] == 3  # two pairs of s1 plus the one of s2
    # a gap of exactly min_score_gap counts
    exact = aggregate(rows, "scores", min_score_gap=1.5)
    assert exact.stats["pairs"] == 3
    # with no gap required, s2's half-point difference makes a pair, T1 over T0
    loose = aggregate(rows, "scores", min_score_gap=0.0)
    assert [text(c.record["chosen"]) for c in loose.candidates][-1] == "T1"


def test_scores_malformed_rows():
    rows = numbered(
        [
            scored("s1", [1, 2], "x"),
            scored("s1", [1, "high", 3], "y"),
            scored("s1", [1, True, 3], "z"),
            scored("s1", [1, float("nan"), 3], "w"),
            scored("s1", "1,2,3", "v"),
            scored("s1", [1, 2, 3], "u"),
        ]
    )
    result = aggregate(rows, "scores")
    assert [d.reason for d in result.dropped] == [
        "scores has 2 values for 3 responses",
        "score 'high' is not a finite number",
        "score True is not a finite number",
        "score nan is not a finite number",
        "scores has no list of values for 3 responses",
    ]
    assert [c.lines for c in result.candidates] == [[6], [6], [6]]
    assert_lines_covered(result, rows)


def test_krippendorff_alpha_interval_by_hand():
    # two annotators, two items of two responses: units (item, response)
    rows = numbered(
        [
            scored("s1", [1, 3], "x", responses=("A", "B")),
            scored("s1", [2, 3], "y", responses=("A", "B")),
            scored("s2", [5, 1], "x", responses=("C", "D")),
            scored("s2", [4, 2], "y", responses=("C", "D")),
        ]
    )
    units = [[1, 2], [3, 3], [5, 4], [1, 2]]
    values = [v for u in units for v in u]
    n = len(values)  # 8 pairable values
    # observed: ordered pairs within a unit, each unit weighted 1 / (m_u - 1)
    d_o = Fraction(
        sum(sum((a - b) ** 2 for a, b in itertools.permutations(u, 2)) for u in units), n
    )
    assert d_o == Fraction(6, 8)
    # expected: ordered pairs of any two pairable values
    d_e = Fraction(sum((a - b) ** 2 for a, b in itertools.permutations(values, 2)), n * (n - 1))
    assert d_e == Fraction(222, 56)
    alpha = 1 - d_o / d_e

    result = aggregate(rows, "scores")
    assert result.stats["agreement"] == {
        "krippendorff_alpha_interval": pytest.approx(float(alpha)),
        "items": 2,
    }
    # a unit with three values: its 6 ordered pairs (1+9+4, twice) are weighted 1 / (3 - 1);
    # Do = (28 / 2 + 0 + 2) / 7 = 16/7; the 7 values 1,2,4,3,3,5,4 give 152 over ordered pairs,
    # De = 152 / (7 * 6); alpha = 1 - (16/7) / (152/42) = 7/19
    assert krippendorff_alpha_interval([[1, 2, 4], [3, 3], [5, 4]]) == pytest.approx(7 / 19)
    assert krippendorff_alpha_interval([[3, 3], [3, 3]]) is None  # no variation at all
    assert krippendorff_alpha_interval([[1, 2]]) is None  # one unit cannot define chance
    assert krippendorff_alpha_interval([[1, 1], [5, 5]]) == 1.0


# -- common ---------------------------------------------------------------------------------


def test_agreement_is_none_without_repeated_judgements():
    rows = numbered([vote("q1", "a", "x"), vote("q2", "b", "x")])
    assert aggregate(rows, "votes").stats["agreement"] == {
        "fleiss_kappa": None,
        "raw_agreement": None,
        "items": 0,
    }


def test_rows_without_annotator_are_anonymous_judgements():
    rows = numbered(
        [{k: v for k, v in vote("q1", c, "x").items() if k != "annotator"} for c in "aab"]
    )
    result = aggregate(rows, "votes")
    assert result.stats["annotators"] == 0
    assert result.stats["malformed"] == 0
    assert result.candidates[0].record["annotator"] == "majority"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "likert"}, "use one of votes, rankings, scores"),
        ({"layout": "scores", "min_score_gap": -1.0}, "min_score_gap must be >= 0"),
        ({"layout": "votes", "min_judgements": 0}, "min_judgements must be >= 1"),
    ],
)
def test_invalid_arguments_name_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        aggregate([], **kwargs)
