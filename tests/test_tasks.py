"""Built-in tasks, the task registry and user task files (JSONL / CSV).

Unit tests use small byte-level BPE tokenizers trained offline (``tasks_fixtures``); the tests
marked ``slow`` use the real SmolLM2-135M tokenizer and model through ``graphs.loading``.
"""

from __future__ import annotations

import json
import re
import string
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuits.tasks import (
    TaskError,
    TaskRow,
    TokenizedTask,
    available_tasks,
    load_task_file,
    make_task,
    pad_id_for,
    read_task_rows,
    special_prefix,
    write_task_rows,
)
from circuits.tasks.encoding import continuation
from circuits.tasks.greater_than import year_mode
from circuits.tasks.ioi import ioi_names

from tests.tasks_fixtures import (
    HELD_OUT_NAMES,
    bos_tokenizer,
    digit_tokenizer,
    make_bpe_tokenizer,
    pair_tokenizer,
    spm_tokenizer,
)

__all__ = ["bos_tokenizer", "digit_tokenizer", "pair_tokenizer", "spm_tokenizer"]  # fixtures used by name

TASKS = sorted(available_tasks())
N = 24


# --------------------------------------------------------------------------- shared invariants


def check_task(task: TokenizedTask, tokenizer) -> None:
    """Every invariant a built (or loaded) task must satisfy for ``tokenizer``."""
    prefix = list(special_prefix(tokenizer))
    pad = pad_id_for(tokenizer)
    n, T = task.clean_ids.shape
    assert task.corrupted_ids.shape == (n, T)
    assert task.pad_id == pad
    assert torch.equal(task.read_positions, task.lengths - 1)
    assert int(task.lengths.max()) == T
    assert len(task.clean_texts) == len(task.corrupted_texts) == n
    for i in range(n):
        L = int(task.lengths[i])
        clean, corrupted = task.clean_ids[i].tolist(), task.corrupted_ids[i].tolist()
        # right padding with pad_id, nothing truncated
        assert clean[L:] == [pad] * (T - L) and corrupted[L:] == [pad] * (T - L)
        # the ids are exactly the prefix + the text's tokens (equal lengths for clean/corrupted)
        assert clean[:L] == prefix + tokenizer.encode(task.clean_texts[i], add_special_tokens=False)
        assert corrupted[:L] == prefix + tokenizer.encode(task.corrupted_texts[i], add_special_tokens=False)
        # ... and decode back to the prompt texts
        assert tokenizer.decode(clean[len(prefix) : L], clean_up_tokenization_spaces=False) == task.clean_texts[i]
        assert (
            tokenizer.decode(corrupted[len(prefix) : L], clean_up_tokenization_spaces=False) == task.corrupted_texts[i]
        )
        # answers: non-empty sets of single tokens, disjoint from the wrong answers
        ans = [a for a in task.answers[i].tolist() if a >= 0]
        wrong = [w for w in task.wrongs[i].tolist() if w >= 0]
        assert ans and wrong and not set(ans) & set(wrong)
        assert len(set(ans)) == len(ans) and len(set(wrong)) == len(wrong)
        for tid in ans + wrong:  # each is the one token its text adds after the clean prompt
            full = tokenizer.decode(clean[len(prefix) : L] + [tid], clean_up_tokenization_spaces=False)
            assert full.startswith(task.clean_texts[i])
            assert continuation(tokenizer, task.clean_texts[i], full[len(task.clean_texts[i]) :]) == (tid,)
        # -1 padding only at the end
        row = task.answers[i].tolist()
        assert row == ans + [-1] * (len(row) - len(ans))


def answer_text(tokenizer, ids: torch.Tensor) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids if int(i) >= 0]


# --------------------------------------------------------------------------- registry


def test_available_tasks_lists_all_six_with_descriptions() -> None:
    tasks = available_tasks()
    assert set(tasks) == {"ioi", "greater-than", "induction", "docstring", "subject-verb", "country-capital"}
    assert all(isinstance(d, str) and d and "\n" not in d for d in tasks.values())
    tasks["ioi"] = "changed"
    assert available_tasks()["ioi"] != "changed"


def test_unknown_task_lists_known_names(digit_tokenizer) -> None:
    with pytest.raises(TaskError) as e:
        make_task("iio", digit_tokenizer)
    for name in TASKS:
        assert name in str(e.value)


def test_bad_n_prompts_and_unknown_option(digit_tokenizer) -> None:
    with pytest.raises(TaskError, match="n_prompts"):
        make_task("ioi", digit_tokenizer, n_prompts=0)
    with pytest.raises(TaskError, match="option"):
        make_task("ioi", digit_tokenizer, n_prompts=2, seq_len=4)


# --------------------------------------------------------------------------- built-in tasks


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("tok", ["digit_tokenizer", "pair_tokenizer", "bos_tokenizer", "spm_tokenizer"])
def test_builtin_task_invariants(name: str, tok: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(tok)
    task = make_task(name, tokenizer, n_prompts=N, seed=3)
    assert task.name == name and len(task) == N and task.seed == 3
    check_task(task, tokenizer)
    assert task.metadata["bos"] == ("yes" if tok in ("bos_tokenizer", "spm_tokenizer") else "no")


def test_sentencepiece_answers_are_taken_in_context(spm_tokenizer, tmp_path: Path) -> None:
    """Llama-2-style tokenizers encode " Mary" alone as ["▁", "▁Mary"]; after a prompt it is one token."""
    assert spm_tokenizer.tokenize(" Mary") == ["\u2581", "\u2581Mary"]
    task = make_task("ioi", spm_tokenizer, n_prompts=8)
    assert int(task.metadata["n_names"]) == len(ioi_names(spm_tokenizer)) > 50
    assert spm_tokenizer.convert_ids_to_tokens(task.answers[:, 0].tolist())[0].startswith("\u2581")
    user = load_task_file(write(tmp_path / "t.jsonl", jsonl(GOOD)), spm_tokenizer)
    check_task(user, spm_tokenizer)
    assert spm_tokenizer.convert_ids_to_tokens(user.answers[0, :1].tolist()) == ["\u2581Mary"]


def test_answer_merging_with_the_prompt_end_is_an_error(tmp_path: Path, digit_tokenizer) -> None:
    row = {**GOOD[0], "clean": GOOD[0]["clean"] + " ", "corrupted": GOOD[0]["corrupted"] + " ", "answer": "Mary"}
    with pytest.raises(TaskError, match=r"row 1: the answer 'Mary' does not tokenize separately .* end in a space"):
        load_task_file(write(tmp_path / "t.jsonl", jsonl([row])), digit_tokenizer)


@pytest.mark.parametrize("name", TASKS)
def test_builtin_task_is_deterministic_in_seed(name: str, digit_tokenizer) -> None:
    a = make_task(name, digit_tokenizer, n_prompts=N, seed=7)
    b = make_task(name, digit_tokenizer, n_prompts=N, seed=7)
    c = make_task(name, digit_tokenizer, n_prompts=N, seed=8)
    assert a.dataset_hash() == b.dataset_hash() and a.clean_texts == b.clean_texts
    assert a.dataset_hash() != c.dataset_hash()
    # a smaller dataset with the same seed is a prefix of the larger one
    small = make_task(name, digit_tokenizer, n_prompts=5, seed=7)
    assert small.clean_texts == a.clean_texts[:5]


def test_bos_prefix_and_pad_fallbacks(bos_tokenizer) -> None:
    bos = bos_tokenizer.bos_token_id
    assert special_prefix(bos_tokenizer) == (bos,)
    task = make_task("ioi", bos_tokenizer, n_prompts=4)
    assert (task.clean_ids[:, 0] == bos).all() and (task.corrupted_ids[:, 0] == bos).all()
    assert task.pad_id == bos_tokenizer.eos_token_id  # no pad token: EOS pads
    bare = make_bpe_tokenizer(pad=False, eos=False)
    assert pad_id_for(bare) == 0
    assert make_task("ioi", bare, n_prompts=2).pad_id == 0


def test_ioi_structure(digit_tokenizer) -> None:
    task = make_task("ioi", digit_tokenizer, n_prompts=60, seed=0)
    names = set(ioi_names(digit_tokenizer))
    assert not names & set(HELD_OUT_NAMES)  # multi-token names are filtered out
    orders = set()
    for i in range(len(task)):
        io = answer_text(digit_tokenizer, task.answers[i])
        s = answer_text(digit_tokenizer, task.wrongs[i])
        assert len(io) == len(s) == 1
        io_name, s_name = io[0].strip(), s[0].strip()
        clean_names = [w for w in re.findall(r"[A-Z][a-z]+", task.clean_texts[i]) if w in names]
        corrupted_names = [w for w in re.findall(r"[A-Z][a-z]+", task.corrupted_texts[i]) if w in names]
        assert sorted(clean_names) == sorted([io_name, s_name, s_name])
        orders.add("ABBA" if clean_names[0] == io_name else "BABA")
        # ABC: three distinct names, none of the clean ones
        assert len(corrupted_names) == 3 == len(set(corrupted_names))
        assert not set(corrupted_names) & {io_name, s_name}
    assert orders == {"ABBA", "BABA"}


def test_ioi_example_shape(digit_tokenizer) -> None:
    task = make_task("ioi", digit_tokenizer, n_prompts=40, seed=1)
    i = next(i for i, t in enumerate(task.clean_texts) if t.startswith("When") and "went to the" in t)
    text = task.clean_texts[i]
    assert re.fullmatch(r"When (\w+) and (\w+) went to the \w+, (\w+) gave a \w+ to", text)


@pytest.mark.parametrize("tok, mode", [("digit_tokenizer", "one-digit"), ("pair_tokenizer", "two-digit")])
def test_greater_than_answer_sets(tok: str, mode: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(tok)
    assert year_mode(tokenizer) == mode
    task = make_task("greater-than", tokenizer, n_prompts=N, seed=0)
    assert task.metadata["mode"] == mode
    for i in range(len(task)):
        m = re.fullmatch(r"The \w+ lasted from the year (\d\d)(\d\d) to the year (\d\d)", task.clean_texts[i])
        assert m and m.group(1) == m.group(3)
        assert task.corrupted_texts[i] == task.clean_texts[i].replace(m.group(1) + m.group(2), m.group(1) + "01", 1)
        yy = int(m.group(2))
        greater = answer_text(tokenizer, task.answers[i])
        smaller = answer_text(tokenizer, task.wrongs[i])
        if mode == "two-digit":
            assert 2 <= yy <= 98
            assert greater == [f"{v:02d}" for v in range(yy + 1, 100)]
            assert smaller == [f"{v:02d}" for v in range(yy + 1)]
        else:
            d = yy // 10
            assert 1 <= d <= 8
            assert greater == [str(v) for v in range(d + 1, 10)]
            assert smaller == [str(v) for v in range(d)]


def test_greater_than_rejects_other_number_tokenizers() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["The", "war", "lasted", "from", "the", "year", "to", "1732", "17", "32", "[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.raises(TaskError, match="greater-than needs"):
        make_task("greater-than", PreTrainedTokenizerFast(tokenizer_object=tok), n_prompts=2)


def test_induction_structure(digit_tokenizer) -> None:
    task = make_task("induction", digit_tokenizer, n_prompts=N, seed=0, seq_len=8)
    assert task.metadata["seq_len"] == "8"
    special = set(digit_tokenizer.all_special_ids)
    for i in range(len(task)):
        L = int(task.lengths[i])
        clean, corrupted = task.clean_ids[i, :L].tolist(), task.corrupted_ids[i, :L].tolist()
        first, repeat = clean[:8], clean[8:]
        assert len(set(first)) == 8 and 4 <= len(repeat) <= 7
        assert repeat == first[: len(repeat)]
        assert int(task.answers[i, 0]) == first[len(repeat)]
        fresh = corrupted[8:]
        assert corrupted[:8] == first and not set(fresh) & set(first)
        wrong = int(task.wrongs[i, 0])
        assert wrong not in clean and wrong not in corrupted
        assert not set(clean + corrupted) & special
        for t in clean:  # ordinary word tokens
            assert re.fullmatch(r" [A-Za-z]{3,}", digit_tokenizer.decode([t]))


def test_induction_bad_options(digit_tokenizer) -> None:
    with pytest.raises(TaskError, match="seq_len"):
        make_task("induction", digit_tokenizer, n_prompts=2, seq_len=2)
    with pytest.raises(TaskError, match="ordinary tokens"):
        make_task("induction", digit_tokenizer, n_prompts=2, seq_len=20, pool_size=10)


def test_docstring_structure(digit_tokenizer) -> None:
    task = make_task("docstring", digit_tokenizer, n_prompts=N, seed=0)
    for i in range(len(task)):
        clean, corrupted = task.clean_texts[i], task.corrupted_texts[i]
        args = re.match(r"def \w+\(self, ([\w, ]+)\):", clean).group(1).split(", ")
        documented = re.findall(r":param (\w+):", clean)
        assert clean.endswith("\n    :param") and 3 <= len(args) <= 5
        assert documented == args[: len(documented)] and 1 <= len(documented) < len(args)
        answer = answer_text(digit_tokenizer, task.answers[i])
        wrongs = answer_text(digit_tokenizer, task.wrongs[i])
        assert answer == [" " + args[len(documented)]]
        assert sorted(wrongs) == sorted(" " + a for a in args if a != args[len(documented)])
        c_args = re.match(r"def \w+\(self, ([\w, ]+)\):", corrupted).group(1).split(", ")
        c_doc = re.findall(r":param (\w+):", corrupted)
        assert len(c_args) == len(args) and len(c_doc) == len(documented)
        assert not set(c_args + c_doc) & set(args) and len(set(c_args + c_doc)) == len(c_args) + len(c_doc)


def test_subject_verb_structure(digit_tokenizer) -> None:
    task = make_task("subject-verb", digit_tokenizer, n_prompts=40, seed=0)
    plural_verbs, singular_verbs = {" are", " were", " have"}, {" is", " was", " has"}
    numbers = set()
    for i in range(len(task)):
        clean, corrupted = task.clean_texts[i].split(" "), task.corrupted_texts[i].split(" ")
        assert clean[0] == corrupted[0] == "The" and clean[2:] == corrupted[2:] and clean[1] != corrupted[1]
        (answer,), (wrong,) = (
            answer_text(digit_tokenizer, task.answers[i]),
            answer_text(digit_tokenizer, task.wrongs[i]),
        )
        plural = answer in plural_verbs
        numbers.add(plural)
        assert (wrong in singular_verbs) == plural
        sg, pl = (corrupted[1], clean[1]) if plural else (clean[1], corrupted[1])
        assert sg != pl and pl.startswith(sg[:3])
    assert numbers == {True, False}


def test_country_capital_structure(digit_tokenizer) -> None:
    from circuits.tasks.words import load_pairs

    capital_of = dict(load_pairs("countries.txt"))
    task = make_task("country-capital", digit_tokenizer, n_prompts=N, seed=0)
    for i in range(len(task)):
        country = next(c for c in sorted(capital_of, key=len, reverse=True) if c in task.clean_texts[i])
        other = next(c for c in sorted(capital_of, key=len, reverse=True) if c in task.corrupted_texts[i])
        assert country != other and task.clean_texts[i].replace(country, other) == task.corrupted_texts[i]
        assert answer_text(digit_tokenizer, task.answers[i]) == [" " + capital_of[country]]
        assert answer_text(digit_tokenizer, task.wrongs[i]) == [" " + capital_of[other]]


def test_subset_and_batches_keep_alignment(digit_tokenizer) -> None:
    task = make_task("induction", digit_tokenizer, n_prompts=10, seed=0)
    parts = list(task.batches(4))
    assert [len(p) for p in parts] == [4, 4, 2]
    for p in parts:
        check_task(p, digit_tokenizer)


# --------------------------------------------------------------------------- user task files


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = [
    {
        "clean": "When Mary and John went to the store, John gave a drink to",
        "corrupted": "When Alice and Adam went to the store, Carl gave a drink to",
        "answer": " Mary",
        "wrong": " John",
    },
    {
        "clean": "The capital of France is",
        "corrupted": "The capital of Spain is",
        "answer": [" Paris", " Rome"],
        "wrong": [" Madrid"],
    },
]


def test_load_jsonl(tmp_path: Path, digit_tokenizer) -> None:
    task = load_task_file(write(tmp_path / "mine.jsonl", jsonl(GOOD)), digit_tokenizer)
    assert task.name == "mine" and len(task) == 2
    check_task(task, digit_tokenizer)
    assert answer_text(digit_tokenizer, task.answers[1]) == [" Paris", " Rome"]
    assert answer_text(digit_tokenizer, task.wrongs[0]) == [" John"]
    assert task.metadata["dropped"] == "0"


def test_load_csv_and_json_array(tmp_path: Path, digit_tokenizer) -> None:
    csv_text = (
        "answer,clean,corrupted,wrong\n"
        '" Mary","When Mary and John went to the store, John gave a drink to",'
        '"When Alice and Adam went to the store, Carl gave a drink to"," John"\n'
        '"[""  Paris"", "" Rome""]",The capital of France is,The capital of Spain is," Madrid"\n'
    ).replace("  Paris", " Paris")
    a = load_task_file(write(tmp_path / "t.csv", csv_text), digit_tokenizer)
    b = load_task_file(write(tmp_path / "t.json", json.dumps(GOOD)), digit_tokenizer)
    c = load_task_file(write(tmp_path / "t2.json", jsonl(GOOD)), digit_tokenizer)
    assert a.dataset_hash() == b.dataset_hash() == c.dataset_hash()


def test_multi_token_answer_names_row_and_tokens(tmp_path: Path, digit_tokenizer) -> None:
    rows = [GOOD[0], {**GOOD[0], "answer": " Christopher"}]
    with pytest.raises(TaskError) as e:
        load_task_file(write(tmp_path / "t.jsonl", jsonl(rows)), digit_tokenizer)
    msg = str(e.value)
    assert "row 2" in msg and "Christopher" in msg and "' Ch'" in msg and "not a single token" in msg
    with pytest.raises(TaskError, match=r"row 1: the wrong .* not a single token"):
        load_task_file(
            write(tmp_path / "w.jsonl", jsonl([{**GOOD[0], "wrong": [" John", " Mary Ann"]}])), digit_tokenizer
        )
    with pytest.raises(
        TaskError, match=r"row 1: the answer '' is not a single token: after the clean prompt it splits into 0 tokens"
    ):
        load_task_file(write(tmp_path / "e.jsonl", jsonl([{**GOOD[0], "answer": ""}])), digit_tokenizer)


def test_misaligned_rows_error_or_drop(tmp_path: Path, digit_tokenizer) -> None:
    bad = {**GOOD[0], "corrupted": "When Alice and Adam went to the big store, Carl gave a drink to"}
    path = write(tmp_path / "t.jsonl", jsonl([GOOD[0], bad, GOOD[1], bad]))
    with pytest.raises(TaskError) as e:
        load_task_file(path, digit_tokenizer)
    assert "row 2" in str(e.value) and "row 4" in str(e.value) and "drop_misaligned" in str(e.value)
    assert "row 1 " not in str(e.value) and "row 3" not in str(e.value)
    with pytest.warns(UserWarning, match="dropped 2 of 4 rows"):
        task = load_task_file(path, digit_tokenizer, drop_misaligned=True)
    assert len(task) == 2 and task.metadata["dropped"] == "2"
    check_task(task, digit_tokenizer)
    with pytest.raises(TaskError, match="all 2 rows were misaligned"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_task_file(write(tmp_path / "all.jsonl", jsonl([bad, bad])), digit_tokenizer, drop_misaligned=True)


@pytest.mark.parametrize(
    "filename, text, pattern",
    [
        ("empty.jsonl", "", "no rows"),
        ("blank.jsonl", "\n  \n\n", "no rows"),
        ("empty.csv", "", "no rows"),
        ("header.csv", "clean,corrupted,answer,wrong\n", "no rows"),
        ("empty.json", "[]", "no rows"),
        (
            "missing.jsonl",
            jsonl([{"clean": "a b", "corrupted": "a c", "answer": " b"}]),
            r"row 1.*missing field\(s\) \['wrong'\]",
        ),
        ("extra.jsonl", jsonl([GOOD[0], {**GOOD[0], "note": "x"}]), r"row 2.*unknown field\(s\) \['note'\]"),
        ("missing.csv", "clean,corrupted,answer\na,b,c\n", r"row 1.*missing field\(s\) \['wrong'\]"),
        ("extra.csv", "clean,corrupted,answer,wrong,note\na,b,c,d,e\n", r"unknown field\(s\) \['note'\]"),
        ("cells.csv", "clean,corrupted,answer,wrong\na,b,c\n", r"row 1.*3 cells"),
        ("dupe.csv", "clean,clean,answer,wrong\na,b,c,d\n", "repeats a column"),
        ("quote.csv", 'clean,corrupted,answer,wrong\n"a,b,c,d\n', "malformed CSV"),
        ("list.csv", 'clean,corrupted,answer,wrong\na,b,"[1, 2",d\n', r"row 1.*not a JSON list"),
        ("badjson.jsonl", jsonl([GOOD[0]]) + '{"clean": "a", \n', r"row 2 \(line 2\): malformed JSON"),
        ("array.json", "[1, 2", "malformed JSON"),
        ("notobj.jsonl", "[1, 2]\n", "expected an object"),
        ("types.jsonl", jsonl([{**GOOD[0], "clean": 3}]), "'clean' must be a string"),
        ("anslist.jsonl", jsonl([{**GOOD[0], "answer": []}]), "non-empty list of strings"),
        ("ansnum.jsonl", jsonl([{**GOOD[0], "answer": [" Mary", 2]}]), "non-empty list of strings"),
        ("overlap.jsonl", jsonl([{**GOOD[0], "wrong": [" John", " Mary"]}]), "both an answer and a wrong answer"),
        ("emptyprompt.jsonl", jsonl([{**GOOD[0], "clean": "", "corrupted": ""}]), "must not be empty"),
        (
            "surrogate.jsonl",
            '{"clean": "a\\ud800", "corrupted": "b", "answer": " x", "wrong": " y"}\n',
            "not valid Unicode",
        ),
        ("task.txt", jsonl(GOOD), "unknown task file type"),
    ],
)
def test_bad_task_files(tmp_path: Path, digit_tokenizer, filename: str, text: str, pattern: str) -> None:
    with pytest.raises(TaskError, match=pattern):
        load_task_file(write(tmp_path / filename, text), digit_tokenizer)


def test_unreadable_files(tmp_path: Path, digit_tokenizer) -> None:
    with pytest.raises(TaskError, match="cannot read"):
        load_task_file(tmp_path / "nope.jsonl", digit_tokenizer)
    (tmp_path / "latin.csv").write_bytes(b"clean,corrupted,answer,wrong\n\xe9,b,c,d\n")
    with pytest.raises(TaskError, match="not UTF-8"):
        load_task_file(tmp_path / "latin.csv", digit_tokenizer)


def test_loading_never_executes_code(tmp_path: Path, digit_tokenizer) -> None:
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    rows = [{"clean": payload, "corrupted": payload, "answer": " x", "wrong": " y"}]
    try:
        load_task_file(write(tmp_path / "t.jsonl", jsonl(rows)), digit_tokenizer)
    except TaskError:
        pass
    assert not marker.exists()


# --------------------------------------------------------------------------- property tests

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
_answers = st.lists(_text, min_size=1, max_size=3).map(tuple)
_rows = st.lists(st.builds(TaskRow, _text, _text, _answers, _answers), min_size=1, max_size=5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_rows, ext=st.sampled_from([".jsonl", ".csv", ".json"]))
def test_rows_round_trip(tmp_path: Path, rows: list[TaskRow], ext: str) -> None:
    path = tmp_path / f"rows{ext}"
    write_task_rows(path, rows)
    assert read_task_rows(path) == rows


_words = st.sampled_from([" Mary", " John", " Paris", " the", " store", " gave", " to", " Christopher", "", " a b"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.builds(
            TaskRow,
            st.lists(_words, min_size=1, max_size=6).map("".join),
            st.lists(_words, min_size=1, max_size=6).map("".join),
            st.lists(_words, min_size=1, max_size=2).map(tuple),
            st.lists(_words, min_size=1, max_size=2).map(tuple),
        ),
        max_size=4,
    ),
    ext=st.sampled_from([".jsonl", ".csv"]),
    drop=st.booleans(),
)
def test_loaded_file_matches_rows_or_raises_task_error(
    tmp_path: Path, digit_tokenizer, rows, ext: str, drop: bool
) -> None:
    path = tmp_path / f"t{ext}"
    write_task_rows(path, rows)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task = load_task_file(path, digit_tokenizer, drop_misaligned=drop)
    except TaskError:
        return
    check_task(task, digit_tokenizer)

    def n_tokens(text: str) -> int:
        return len(digit_tokenizer.encode(text, add_special_tokens=False))

    aligned = [r for r in rows if n_tokens(r.clean) == n_tokens(r.corrupted)]
    assert task.clean_texts == tuple(r.clean for r in aligned)
    assert int(task.metadata["dropped"]) == len(rows) - len(aligned)
    assert drop or len(aligned) == len(rows)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["clean", "corrupted", "answer", "wrong", "x"]), inner, max_size=5)
    ),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.lists(_json_values, max_size=4).map(lambda vs: "\n".join(json.dumps(v) for v in vs).encode()),
        st.lists(st.lists(st.text(alphabet=string.printable, max_size=8), max_size=5), max_size=4).map(
            lambda rows: "\n".join(",".join(r) for r in [["clean", "corrupted", "answer", "wrong"], *rows]).encode()
        ),
    ),
    ext=st.sampled_from([".jsonl", ".csv", ".json"]),
)
def test_malformed_input_raises_only_task_error(tmp_path: Path, digit_tokenizer, data: bytes, ext: str) -> None:
    path = tmp_path / f"fuzz{ext}"
    path.write_bytes(data)
    try:
        task = load_task_file(path, digit_tokenizer, drop_misaligned=True)
    except TaskError:
        return
    check_task(task, digit_tokenizer)


# --------------------------------------------------------------------------- real tokenizer / model


@pytest.mark.slow
@pytest.mark.parametrize("name", TASKS)
def test_builtin_tasks_on_smollm2_tokenizer(name: str, smollm2) -> None:
    tokenizer = smollm2.tokenizer
    task = make_task(name, tokenizer, n_prompts=64, seed=0)
    check_task(task, tokenizer)
    assert task.metadata["bos"] == "no"
    if name == "greater-than":
        assert task.metadata["mode"] == "one-digit"  # SmolLM2 writes numbers digit by digit


def _read_logits(model, task: TokenizedTask, ids: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Logits at the read positions [N, V] from a plain HF forward (right padding is inert: causal)."""
    out = []
    with torch.no_grad():
        for lo in range(0, len(task), batch):
            read = task.read_positions[lo : lo + batch]  # [B]
            keep = torch.unique(read)  # only unembed the positions that are read
            logits = model(ids[lo : lo + batch, : int(keep.max()) + 1], logits_to_keep=keep).logits  # [B, P, V]
            out.append(logits[torch.arange(len(read)), torch.searchsorted(keep, read)])
    return torch.cat(out)  # [N, V]


@pytest.mark.slow
def test_smollm2_prefers_indirect_object(smollm2) -> None:
    task = make_task("ioi", smollm2.tokenizer, n_prompts=64, seed=0)
    logits = _read_logits(smollm2.model, task, task.clean_ids)
    io = logits.gather(1, task.answers[:, :1])[:, 0]
    s = logits.gather(1, task.wrongs[:, :1])[:, 0]
    assert (io > s).float().mean() >= 0.9


# Measured on SmolLM2-135M (64 prompts, seed 0): mean clean logit diff ioi 4.3, greater-than 3.3,
# induction ~9, docstring 7.3, subject-verb 2.3, country-capital 9.8; corrupted prompts all
# lower by at least 2. The thresholds below leave a wide margin.
@pytest.mark.slow
@pytest.mark.parametrize("name", TASKS)
def test_smollm2_does_every_task(name: str, smollm2) -> None:
    from circuits.metrics import make_metric

    task = make_task(name, smollm2.tokenizer, n_prompts=32, seed=0)
    metric = make_metric("logit_diff")
    clean = metric(_read_logits(smollm2.model, task, task.clean_ids), task.answers, task.wrongs)
    corrupted = metric(_read_logits(smollm2.model, task, task.corrupted_ids), task.answers, task.wrongs)
    assert clean > 1.0
    assert clean - corrupted > 1.0
