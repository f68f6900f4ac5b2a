"""Task registry: release formats, templates, subsets, data-dir resolution, hub fallback, format errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from varlora.tasks import (
    BOOLQ_LOCAL_TRAIN_ROWS,
    DATA_DIR_ENV,
    MMLU_SUBJECTS,
    DataFormatError,
    Example,
    get_task,
    jsonl_task,
    list_tasks,
    register_task,
    resolve_data_dir,
)
from varlora.tasks import registry as registry_module

requires_shared_data = pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared data not present")


def _write(path: Path, rows: list) -> Path:
    """JSON lines; a str row is written verbatim (to write broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _arc(ident: str, labels: str, key: str) -> dict:
    choices = [{"text": f"choice {label}", "label": label} for label in labels]
    return {"id": ident, "question": {"stem": f"stem {ident}?", "choices": choices}, "answerKey": key}


def _wino(ident: str, answer: str = "1") -> dict:
    return {
        "qID": ident,
        "sentence": "Sam gave Al a book because _ was kind.",
        "option1": "Sam",
        "option2": "Al",
        "answer": answer,
    }


def _boolq(idx: int, label: bool = True) -> dict:
    return {"question": f"is {idx} even", "passage": f"Passage {idx}.", "idx": idx, "label": label}


def _mmlu(answer: int = 2) -> dict:
    return {
        "question": "What is 2 + 2?",
        "subject": "college_physics",
        "choices": ["1", "2", "4", "5"],
        "answer": answer,
    }


def _generic(**overrides) -> dict:
    return {
        "question": "Which is a mammal?",
        "choices": ["whale", "shark", "trout"],
        "answer": 0,
        **overrides,
    }


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A small data folder in the release formats."""
    root = tmp_path / "data"
    _write(root / "arc/ARC-Easy-Train.jsonl", [_arc("t1", "ABCD", "C"), _arc("t2", "ABC", "A")])
    _write(
        root / "arc/ARC-Easy-Dev.jsonl",
        [_arc("d1", "1234", "4"), _arc("d2", "ABCDE", "E"), _arc("d3", "ABCD", "B")],
    )
    _write(root / "winogrande/train_s.jsonl", [_wino("w1", "2")])
    _write(root / "winogrande/dev.jsonl", [_wino("w2", "1")])
    _write(root / "boolq/val.jsonl", [_boolq(i, i % 3 == 0) for i in range(BOOLQ_LOCAL_TRAIN_ROWS + 3)])
    _write(root / "mmlu/college_physics-test.jsonl", [_mmlu(2), _mmlu(0)])
    return root


def test_registry_names_and_lookup():
    names = list_tasks()
    expected = {"winogrande_s", "winogrande_m", "arc_challenge", "arc_easy", "obqa", "boolq"}
    assert expected | {f"mmlu_{s}" for s in MMLU_SUBJECTS} <= set(names) and names == sorted(names)
    assert get_task("arc_easy").num_choices == 4 and get_task("winogrande_m").num_choices == 2
    with pytest.raises(ValueError, match="unknown task 'arc'.*arc_easy"):
        get_task("arc")
    with pytest.raises(ValueError, match="already registered"):
        register_task(get_task("arc_easy"))


def test_register_task(monkeypatch, tmp_path):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    task = jsonl_task(train=_write(tmp_path / "t.jsonl", [_generic()]), name="mine")
    assert register_task(task) is task and get_task("mine") is task and "mine" in list_tasks()
    assert register_task(task, overwrite=True) is task


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    assert resolve_data_dir() is None  # no ../shared/data here
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert resolve_data_dir() is None  # the library never looks in ../shared (the command line does)
    env = tmp_path / "env"
    env.mkdir()
    monkeypatch.setenv(DATA_DIR_ENV, str(env))
    assert resolve_data_dir() == env
    assert resolve_data_dir(tmp_path) == tmp_path  # the argument wins
    with pytest.raises(FileNotFoundError, match="data_dir points to"):
        resolve_data_dir(tmp_path / "missing")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=f"{DATA_DIR_ENV} points to"):
        resolve_data_dir()


def test_arc_filters_to_four_choices_and_maps_digit_labels(data_dir):
    task = get_task("arc_easy")
    dev = task.load("validation", data_dir)
    assert [ex.id for ex in dev] == ["d1", "d3"]  # the 5-choice question is dropped
    assert dev[0] == Example("d1", "stem d1?", ("choice 1", "choice 2", "choice 3", "choice 4"), 3)
    assert dev[1].label == 1
    assert [ex.id for ex in task.load("train", data_dir)] == ["t1"]
    assert task.source("validation", data_dir).endswith(
        "ARC-Easy-Dev.jsonl; questions with exactly 4 choices"
    )


def test_winogrande_boolq_mmlu_release_formats(data_dir):
    (w,) = get_task("winogrande_s").load("train", data_dir)
    assert w == Example("w1", "Sam gave Al a book because _ was kind.", ("Sam", "Al"), 1)
    boolq = get_task("boolq")
    train, val = boolq.load("train", data_dir), boolq.load("validation", data_dir)
    assert len(train) == BOOLQ_LOCAL_TRAIN_ROWS and len(val) == 3
    assert val[0] == Example("boolq/val-2000", "is 2000 even", ("True", "False"), 1, passage="Passage 2000.")
    assert train[0].label == 0  # label true -> choice 0 ("True")
    assert "records [2000, end)" in boolq.source("validation", data_dir)
    assert "records [0, 2000)" in boolq.source("train", data_dir)
    mmlu = get_task("mmlu_college_physics").load("validation", data_dir)
    assert [ex.label for ex in mmlu] == [2, 0] and mmlu[0].id == "mmlu/college_physics-test-1"


def test_subsets_are_deterministic_and_keep_file_order(data_dir):
    task = get_task("boolq")
    full = task.load("train", data_dir)
    assert task.load("train", data_dir, limit=5) == full[:5]
    a = task.load("train", data_dir, limit=50, seed=1)
    assert (
        a == task.load("train", data_dir, limit=50, seed=1) != task.load("train", data_dir, limit=50, seed=2)
    )
    positions = [full.index(ex) for ex in a]
    assert positions == sorted(positions) and len(set(positions)) == 50
    assert task.load("train", data_dir, limit=10**6, seed=3) == full
    with pytest.raises(ValueError, match="limit must be >= 0"):
        task.load("train", data_dir, limit=-1, seed=0)
    with pytest.raises(ValueError, match="split must be one of"):
        task.load("test", data_dir)


def test_letter_templates_are_the_published_ones():
    arc = Example("a", "Which gas do plants absorb?", ("oxygen", "carbon dioxide", "helium", "neon"), 1)
    prompt, answers = get_task("arc_easy").letter_prompt(arc)
    assert prompt == (
        "Select one of the choices that answers the following question: Which gas do plants absorb? "
        "Choices: A. oxygen. B. carbon dioxide. C. helium. D. neon. Answer:"
    )
    assert answers == (" A", " B", " C", " D")
    wino = Example("w", "Sam thanked Al because _ helped.", ("Sam", "Al"), 1)
    prompt, answers = get_task("winogrande_s").letter_prompt(wino)
    assert prompt == (
        "Select one of the choices that answers the following question: Sam thanked Al because _ helped. "
        "Choices: A. Sam. B. Al. Answer:"
    )
    assert answers == (" A", " B")
    boolq = Example("b", "is the sky blue", ("True", "False"), 0, passage="The sky is blue.")
    prompt, answers = get_task("boolq").letter_prompt(boolq)
    assert prompt == "Answer the question with only True or False: is the sky blue Context: The sky is blue."
    assert answers == (" True", " False")


def test_cloze_pairs():
    arc = Example("a", "Which gas do plants absorb?", ("oxygen", "carbon dioxide"), 1)
    assert get_task("arc_easy").cloze_pairs(arc) == [
        ("Question: Which gas do plants absorb?\nAnswer:", " oxygen"),
        ("Question: Which gas do plants absorb?\nAnswer:", " carbon dioxide"),
    ]
    # lm-eval-harness partial evaluation: the option goes into the context, the rest is the continuation
    wino = Example("w", "Sam thanked Al because _ helped.", ("Sam", "Al"), 1)
    assert get_task("winogrande_m").cloze_pairs(wino) == [
        ("Sam thanked Al because Sam", " helped."),
        ("Sam thanked Al because Al", " helped."),
    ]
    boolq = Example("b", "is the sky blue", ("True", "False"), 0, passage="The sky is blue.")
    context = "The sky is blue.\nQuestion: is the sky blue?\nAnswer:"
    assert get_task("boolq").cloze_pairs(boolq) == [(context, " yes"), (context, " no")]


def test_example_validation():
    with pytest.raises(ValueError, match="label 2 out of range for 2 choices"):
        Example("x", "q", ("a", "b"), 2)
    with pytest.raises(ValueError, match="no choices"):
        Example("x", "q", (), 0)


# (task, split, file under the data folder, bad line, field, message)
_ERRORS = [
    ("arc_easy", "ARC-Easy-Dev", "{not json", None, "invalid JSON"),
    ("arc_easy", "ARC-Easy-Dev", "[1, 2]", None, "expected a JSON object, got list"),
    (
        "arc_easy",
        "ARC-Easy-Dev",
        {"id": "x", "question": {"stem": "s", "choices": []}},
        "answerKey",
        "missing",
    ),
    ("arc_easy", "ARC-Easy-Dev", {**_arc("x", "AB", "A"), "id": 7}, "id", "expected str, got int"),
    (
        "arc_easy",
        "ARC-Easy-Dev",
        {"id": "x", "question": {"stem": 3, "choices": []}, "answerKey": "A"},
        "question.stem",
        "expected str",
    ),
    (
        "arc_easy",
        "ARC-Easy-Dev",
        {
            "id": "x",
            "question": {"stem": "s", "choices": [{"text": "a", "label": "A"}, "b"]},
            "answerKey": "A",
        },
        "question.choices[1]",
        "expected an object",
    ),
    (
        "arc_easy",
        "ARC-Easy-Dev",
        {"id": "x", "question": {"stem": "s", "choices": [{"text": "a"}]}, "answerKey": "A"},
        "question.choices[0].label",
        "missing",
    ),
    ("arc_easy", "ARC-Easy-Dev", _arc("x", "ABCD", "E"), "answerKey", "'E' is not one of the choice labels"),
    ("winogrande_s", "winogrande/dev", _wino("x", "3"), "answer", "must be '1' or '2', got '3'"),
    ("winogrande_s", "winogrande/dev", {**_wino("x"), "sentence": "no blank"}, "sentence", "exactly one '_'"),
    (
        "winogrande_s",
        "winogrande/dev",
        {**_wino("x"), "option2": None},
        "option2",
        "expected str, got NoneType",
    ),
    ("boolq", "boolq/val", {**_boolq(0), "label": "yes"}, "label", "expected bool, got str"),
    ("boolq", "boolq/val", {**_boolq(0), "idx": True}, "idx", "expected int, got bool"),
    ("mmlu_college_physics", "mmlu/college_physics-test", _mmlu(4), "answer", "4 out of range for 4 choices"),
    (
        "mmlu_college_physics",
        "mmlu/college_physics-test",
        {**_mmlu(), "choices": ["a", "b", "c"]},
        "choices",
        "expected 4 choices, got 3",
    ),
    (
        "mmlu_college_physics",
        "mmlu/college_physics-test",
        {**_mmlu(), "choices": ["a", "b", 3, "d"]},
        "choices[2]",
        "expected str, got int",
    ),
]


@pytest.mark.parametrize("task, stem, bad, field, message", _ERRORS)
def test_release_format_errors_name_file_line_and_field(tmp_path, task, stem, bad, field, message):
    folder = "arc/" if stem.startswith("ARC") else ""
    good = {
        "arc_easy": _arc("ok", "ABCD", "A"),
        "winogrande_s": _wino("ok"),
        "boolq": _boolq(0),
        "mmlu_college_physics": _mmlu(),
    }[task]
    split = "validation" if task != "boolq" else "train"
    path = _write(tmp_path / f"{folder}{stem}.jsonl", [good, "   ", bad, good])  # blank line 2 is skipped
    with pytest.raises(DataFormatError) as info:
        get_task(task).load(split, tmp_path)
    e = info.value
    assert isinstance(e, ValueError) and e.source == str(path) and e.line == 3 and e.field == field
    assert message in str(e) and str(path) in str(e) and "line 3" in str(e)


@pytest.mark.parametrize(
    "bad, field, message",
    [
        ({"choices": ["a", "b"], "answer": 0}, "question", "missing"),
        (_generic(answer="AB"), "answer", "expected an index or a single letter, got 'AB'"),
        (_generic(answer="D"), "answer", "'D' out of range for 3 choices"),
        (_generic(answer=3), "answer", "3 out of range for 3 choices"),
        (_generic(answer=-1), "answer", "-1 out of range"),
        (_generic(answer=True), "answer", "expected int or str, got bool"),
        (_generic(answer=1.0), "answer", "expected int or str, got float"),
        (_generic(choices="abc"), "choices", "expected list, got str"),
        (_generic(choices=["a", 2]), "choices[1]", "expected str, got int"),
        (_generic(choices=["only"]), "choices", "needs at least 2 choices"),
        (_generic(id=[1]), "id", "expected str or int, got list"),
    ],
)
def test_generic_format_errors(tmp_path, bad, field, message):
    path = _write(tmp_path / "mine.jsonl", [_generic(), bad])
    with pytest.raises(DataFormatError, match="line 2") as info:
        jsonl_task(train=path).load("train")
    assert info.value.field == field and message in str(info.value) and str(path) in str(info.value)


def test_jsonl_task_and_specs(tmp_path, monkeypatch):
    train = _write(
        tmp_path / "train.jsonl", [_generic(), _generic(answer="b", id=12, choices=["x", "y"])]
    ).resolve()
    val = _write(
        tmp_path / "validation.jsonl", [_generic(answer="C", choices=["p", "q", "r", "s"])]
    ).resolve()
    task = jsonl_task(train, val)
    a, b = task.load("train")
    assert a == Example("train-1", "Which is a mammal?", ("whale", "shark", "trout"), 0)
    assert b == Example("12", "Which is a mammal?", ("x", "y"), 1)
    assert task.load("validation")[0].label == 2 and task.num_choices == 4  # max over both files
    assert task.letter_prompt(b)[1] == (" A", " B")
    assert task.source("train").endswith(str(train))
    specs = [f"jsonl:{train},{val}", f"jsonl:train={train},validation={val}", f"jsonl:{tmp_path}"]
    for spec in specs:
        t = get_task(spec)
        assert t.name == spec and t.files == {"train": train, "validation": val}
    only_train = get_task(f"jsonl:{train}")
    assert only_train.files == {"train": train} and only_train.num_choices == 3
    with pytest.raises(ValueError, match="has no validation file"):
        only_train.load("validation")
    assert get_task(f"jsonl:validation={val}").files == {"validation": val}
    monkeypatch.chdir(tmp_path)
    assert jsonl_task("train.jsonl").files["train"] == train  # relative paths resolved at creation
    for bad in (
        "jsonl:test=a.jsonl",
        f"jsonl:{train},{val},{val}",
        "jsonl:",
        f"jsonl:train={train},train={val}",
    ):
        with pytest.raises(ValueError, match="bad task spec"):
            get_task(bad)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        get_task("jsonl:missing.jsonl")
    with pytest.raises(ValueError, match="needs a train or a validation file"):
        jsonl_task()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds neither"):
        get_task(f"jsonl:{tmp_path / 'empty'}")


# ---- hub fallback (datasets.load_dataset monkeypatched: there is no hub access here) ----

_HUB_ROWS = {
    ("allenai/ai2_arc", "ARC-Challenge"): [
        {
            "id": "h1",
            "question": "Q?",
            "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]},
            "answerKey": "B",
        },
        {
            "id": "h2",
            "question": "Q?",
            "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]},
            "answerKey": "B",
        },
    ],
    ("allenai/openbookqa", "main"): [
        {
            "id": "o1",
            "question_stem": "Sun is",
            "choices": {"text": ["hot", "cold", "wet", "dry"], "label": ["A", "B", "C", "D"]},
            "answerKey": "A",
        },
    ],
    ("allenai/winogrande", "winogrande_m"): [
        {
            "sentence": "Sam gave Al a book because _ was kind.",
            "option1": "Sam",
            "option2": "Al",
            "answer": "1",
        }
    ],
    ("google/boolq", None): [{"question": "is it", "answer": False, "passage": "It is not."}],
    ("cais/mmlu", "college_chemistry"): [_mmlu(1)],
}
_WINO_HUB = Example(
    "allenai/winogrande/winogrande_m:train-1", "Sam gave Al a book because _ was kind.", ("Sam", "Al"), 0
)
_BOOLQ_HUB = Example("google/boolq:train-0", "is it", ("True", "False"), 1, passage="It is not.")
_MMLU_HUB = Example("cais/mmlu/college_chemistry:test-1", "What is 2 + 2?", ("1", "2", "4", "5"), 1)
_HUB_CASES = [
    ("arc_challenge", "validation", "validation", Example("h1", "Q?", ("a", "b", "c", "d"), 1)),
    ("obqa", "train", "train", Example("o1", "Sun is", ("hot", "cold", "wet", "dry"), 0)),
    ("winogrande_m", "train", "train", _WINO_HUB),
    ("boolq", "train", "train", _BOOLQ_HUB),  # the real train split on the hub
    ("mmlu_college_chemistry", "validation", "test", _MMLU_HUB),
]


@pytest.mark.parametrize("name, split, hub_split, expected", _HUB_CASES)
def test_hub_fallback_when_local_file_is_absent(tmp_path, monkeypatch, name, split, hub_split, expected):
    import datasets

    calls = []

    def load_dataset(path, config=None, split=None):
        calls.append((path, config, split))
        return _HUB_ROWS[(path, config)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    task = get_task(name)
    assert task.load(split, tmp_path)[0] == expected  # tmp_path: a data folder without the file
    assert calls[0][2] == hub_split and calls[0][:2] in _HUB_ROWS
    assert task.source(split, tmp_path).startswith(f"{name} {split}: hub {calls[0][0]}")
    if name == "arc_challenge":
        assert len(task.load(split, tmp_path)) == 1  # the 4-choice filter applies to hub rows too


def test_hub_rows_are_validated_like_files(tmp_path, monkeypatch):
    import datasets

    bad = [{"sentence": "no blank here", "option1": "a", "option2": "b", "answer": "1"}]
    monkeypatch.setattr(datasets, "load_dataset", lambda path, config=None, split=None: bad)
    with pytest.raises(
        DataFormatError, match=r"hub allenai/winogrande \(winogrande_s\) split 'train', line 1"
    ):
        get_task("winogrande_s").load("train", tmp_path)


def test_hub_failure_is_a_clear_file_not_found(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        FileNotFoundError, match=r"ARC-Easy-Dev.jsonl not found, and loading hub .* no network"
    ):
        get_task("arc_easy").load("validation", tmp_path)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here: no local folder at all
    with pytest.raises(FileNotFoundError, match="no local data folder"):
        get_task("boolq").load("train")


# ---- the real data in ../shared/data ----


@pytest.mark.real
@requires_shared_data
def test_real_data_sizes_and_protocol():
    sizes = {
        "arc_easy": (2241, 567),
        "arc_challenge": (1117, 295),
        "obqa": (4957, 500),
        "winogrande_s": (640, 1267),
        "winogrande_m": (2558, 1267),
        "boolq": (BOOLQ_LOCAL_TRAIN_ROWS, 3270 - BOOLQ_LOCAL_TRAIN_ROWS),
        "mmlu_college_chemistry": (5, 100),
        "mmlu_college_physics": (5, 102),
    }
    for name, (n_train, n_val) in sizes.items():
        task = get_task(name)
        assert (len(task.load("train", SHARED_DATA)), len(task.load("validation", SHARED_DATA))) == (
            n_train,
            n_val,
        )
    dev = get_task("arc_easy").load("validation", SHARED_DATA)
    raw = [json.loads(line) for line in (SHARED_DATA / "arc/ARC-Easy-Dev.jsonl").open()]
    digit = next(r for r in raw if r["answerKey"].isdigit())
    (ex,) = [e for e in dev if e.id == digit["id"]]
    assert ex.label == int(digit["answerKey"]) - 1 and len(ex.choices) == 4
