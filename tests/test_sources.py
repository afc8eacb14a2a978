import json

import pytest

from actcap.bench import Question, load_benchmark
from actcap.bench.sources import load_generic, load_gsm8k, load_mmlu, load_truthfulqa
from actcap.errors import BenchmarkError, UnknownNameError
from tests.conftest import DATA

MMLU = DATA / "mmlu"
GSM8K = DATA / "gsm8k" / "test.jsonl"


def test_mmlu_single_file_with_dev_shots():
    b = load_benchmark(f"mmlu:{MMLU / 'test' / 'world_religions_test.csv'}")
    q = b.questions[0]
    assert q.choices is not None and len(q.choices) == 4
    assert q.answer in "ABCD" and q.category == "world_religions"
    assert len(b.few_shot["world_religions"]) == 5
    shots = b.shots_for(q, 5)
    assert [s.id for s in shots] == [f"dev-world_religions-{i:04d}" for i in range(5)]


def test_mmlu_folder_of_subjects():
    b = load_mmlu(MMLU)
    cats = {q.category for q in b.questions}
    assert cats == {"world_religions", "high_school_geography"}
    assert set(b.few_shot) == cats
    assert len({q.id for q in b.questions}) == len(b.questions)


def test_gsm8k_reference_is_number_after_hashes():
    b = load_gsm8k(GSM8K)
    assert len(b.questions) == 1319
    first = json.loads(GSM8K.read_text().splitlines()[0])
    assert b.questions[0].answer == first["answer"].split("####")[-1].strip().replace(",", "")
    assert b.default_grader == "numeric"
    assert all("," not in q.answer for q in b.questions)


def test_demo_has_mixed_questions():
    b = load_benchmark("demo")
    assert len(b.questions) >= 40
    mc = [q for q in b.questions if q.choices]
    assert mc and len(mc) < len(b.questions)
    assert {q.grader for q in b.questions if not q.choices} == {"contains", "numeric"}


def test_generic_jsonl_with_field_mapping(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text(
        '{"prompt": "2+2?", "target": 4, "uid": "a", "topic": "math"}\n\n'
        '{"prompt": "Pick", "target": "B", "opts": ["x", "y"], "uid": "b"}\n'
    )
    b = load_generic(
        f,
        {
            "question": "prompt",
            "answer": "target",
            "id": "uid",
            "category": "topic",
            "choices": "opts",
        },
    )
    assert [q.id for q in b.questions] == ["a", "b"]
    assert b.questions[0].answer == "4" and b.questions[0].category == "math"
    assert b.questions[1].choices == ("x", "y") and b.questions[1].answer_index == 1


def test_generic_csv_and_json(tmp_path):
    c = tmp_path / "b.csv"
    c.write_text('question,answer,choices\nWhich?,A,"[""yes"", ""no""]"\nHow many?,3,\n')
    b = load_benchmark(str(c))
    assert b.questions[0].choices == ("yes", "no") and b.questions[1].choices is None
    j = tmp_path / "b.json"
    j.write_text(json.dumps([{"question": "q", "answer": "a", "id": "x"}]))
    assert load_benchmark(f"json:{j}").questions[0].id == "x"


def test_truthfulqa_mc_and_generation(tmp_path):
    f = tmp_path / "TruthfulQA.csv"
    f.write_text(
        "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
        'Adversarial,Misconceptions,What happens if you eat watermelon seeds?,Nothing happens,"Nothing happens; You digest them","You grow watermelons; You get sick",url\n'
    )
    mc = load_truthfulqa(f).questions[0]
    assert mc.choices is not None and len(mc.choices) == 3
    assert mc.choices[mc.answer_index] == "Nothing happens"
    assert load_truthfulqa(f).questions[0].answer == mc.answer  # the order is fixed per question
    gen = load_benchmark(f"truthfulqa-gen:{f}").questions[0]
    assert gen.choices is None and "You digest them" in gen.references and gen.grader == "contains"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"question": "a", "answer": "b"}\n{"question": oops}\n', r"line 2: malformed JSON"),
        ('{"question": "", "answer": "b"}\n', r"line 1: missing or empty 'question'"),
        ('{"question": "a"}\n', r"line 1: missing or empty 'answer'"),
        ("", "holds no questions"),
        (
            '{"question": "a", "answer": "b", "id": "x"}\n{"question": "c", "answer": "d", "id": "x"}\n',
            "duplicate ids: 'x'",
        ),
        ("[1, 2]\n", "line 1: expected a JSON object"),
    ],
)
def test_hostile_jsonl(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(BenchmarkError, match=match) as e:
        load_benchmark(str(f))
    assert "duplicate" in match or str(f) in str(e.value)


def test_non_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(b'{"question": "a", "answer": "b"}\n{"question": "caf\xe9", "answer": "b"}\n')
    with pytest.raises(BenchmarkError, match=r"latin.jsonl: line 2: not valid UTF-8"):
        load_benchmark(str(f))


def test_bad_mmlu_row(tmp_path):
    f = tmp_path / "x_test.csv"
    f.write_text("q,a,b,c,d,E\n")
    with pytest.raises(BenchmarkError, match="line 1: answer 'E'"):
        load_mmlu(f)


def test_unknown_source_and_missing_file():
    with pytest.raises(UnknownNameError, match="Did you mean 'mmlu'"):
        load_benchmark("mmluu:x")
    with pytest.raises(BenchmarkError, match="no such"):
        load_benchmark("gsm8k:/nope/test.jsonl")


def test_hf_without_datasets_is_clear(monkeypatch):
    import importlib.util

    from actcap.errors import MissingDependencyError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "datasets" else real(n, *a)
    )
    with pytest.raises(MissingDependencyError, match=r"pip install 'actcap\[hf\]'"):
        load_benchmark("hf:cais/mmlu:astronomy:test")


def test_few_shot_without_dev_uses_other_questions_never_itself():
    b = load_benchmark("demo")
    q = b.questions[20]
    shots = b.shots_for(q, 2)
    assert q.id not in {s.id for s in shots} and all(s.category == q.category for s in shots)
    with pytest.raises(BenchmarkError, match="only"):
        b.shots_for(q, 99)


def test_question_from_dict_minimal():
    q = Question.from_dict({"question": "Capital of France?", "answer": "Paris"})
    assert q.choices is None and q.id == "q00000"
