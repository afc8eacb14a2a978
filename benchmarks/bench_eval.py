"""End-to-end evaluation on MMLU questions in log-likelihood mode.

The hand-written loop (one question at a time, full logits and hidden states, ``torch.save`` per
question), actcap with capture, actcap without, and lm-evaluation-harness on the same questions.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.bench.prompts import build_prompt
from actcap.capture import CaptureSpec
from benchmarks.common import MMLU_FILE, Figures, skip


@torch.inference_mode()
def naive_loop(lm: Any, bench: Any, few_shot: int, out: Path) -> float:
    """What a hand-written script does."""
    out.mkdir(parents=True, exist_ok=True)
    letters = [lm.tokenizer.encode(f" {c}", add_special_tokens=False)[0] for c in "ABCD"]
    correct = 0
    for q in bench.questions:
        prompt = build_prompt(lm.tokenizer, q, bench.shots_for(q, few_shot), "loglik")
        ids = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(lm.device)
        result = lm.model(**ids, output_hidden_states=True)
        choice = "ABCD"[int(result.logits[0, -1, letters].argmax())]
        correct += choice == q.answer
        acts = {"embeddings": result.hidden_states[0][0, -1].cpu()}
        acts.update({f"layer_{i}": h[0, -1].cpu() for i, h in enumerate(result.hidden_states[1:])})
        torch.save({"prompt": prompt, "response": choice, "activations": acts}, out / f"{q.id}.pt")
    return correct / len(bench.questions)


def lm_eval_run(
    lm: Any, bench: Any, few_shot: int, batch_size: int, device: str, tmp: Path
) -> float | None:
    """lm-evaluation-harness on the same questions, offline, from a local task YAML."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        skip("eval", "lm-eval not installed (pip install 'actcap[bench]')")
        return None
    data = tmp / "lmeval"
    data.mkdir(parents=True, exist_ok=True)
    rows = [
        {"question": q.question, "choices": list(q.choices), "answer": "ABCD".index(q.answer)}
        for q in bench.questions
    ]
    (data / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dev = bench.few_shot.get(bench.questions[0].category, [])
    (data / "dev.jsonl").write_text(
        "\n".join(
            json.dumps(
                {
                    "question": q.question,
                    "choices": list(q.choices),
                    "answer": "ABCD".index(q.answer),
                }
            )
            for q in dev
        )
        + "\n"
    )
    (data / "actcap_mmlu.yaml").write_text(
        "task: actcap_mmlu\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data / 'test.jsonl'}\n    dev: {data / 'dev.jsonl'}\n"
        "test_split: test\n"
        "fewshot_split: dev\n"
        "fewshot_config:\n  sampler: first_n\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"\n'
        'doc_to_choice: ["A", "B", "C", "D"]\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n"
    )
    result = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={lm.source},dtype=float32",
        tasks=["actcap_mmlu"],
        num_fewshot=few_shot,
        batch_size=batch_size,
        device=device,
        task_manager=TaskManager(include_path=str(data)),
    )
    return float(result["results"]["actcap_mmlu"]["acc,none"])


def with_capture(
    lm: Any, bench: Any, capture: CaptureSpec, args: Any, few: int, out: Path, figures: Figures
) -> float:
    """actcap with capture; also reports how long the model waited on the writer."""
    r = run_benchmark(
        lm,
        bench,
        capture=capture,
        options=EvalOptions(mode="loglik", batch_size=args.batch_size, few_shot=few),
        out=out,
        progress=False,
    )
    share = r.write_wait_seconds / r.wall_seconds
    print(
        f"  (model waiting on a full write queue: {r.write_wait_seconds:.3f} s of {r.wall_seconds:.1f} s, {share:.1%})"
    )
    figures.add(
        "eval", "write queue wait", seconds=r.write_wait_seconds, wall=r.wall_seconds, share=share
    )
    return float(r.accuracy)


def main(lm: Any, args: Any, figures: Figures) -> None:
    n = 8 if args.quick else 64
    bench = load_benchmark(f"mmlu:{MMLU_FILE}").limited(n)
    few = args.few_shot
    capture = CaptureSpec(layers=None, token_selection="last")
    print(
        f"\n## evaluation, {n} MMLU questions, {few}-shot, log-likelihood, batch {args.batch_size}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, Any] = {
            "hand-written loop (batch 1, full logits, torch.save)": lambda: naive_loop(
                lm, bench, few, Path(tmp) / f"naive{time.time_ns()}"
            ),
            "actcap, capture every layer (last token)": lambda: with_capture(
                lm, bench, capture, args, few, Path(tmp) / f"a{time.time_ns()}", figures
            ),
            "actcap --no-capture": lambda: (
                run_benchmark(
                    lm,
                    bench,
                    capture=None,
                    options=EvalOptions(mode="loglik", batch_size=args.batch_size, few_shot=few),
                    progress=False,
                ).accuracy
            ),
            "lm-evaluation-harness (no capture)": lambda: lm_eval_run(
                lm, bench, few, args.batch_size, args.device, Path(tmp)
            ),
        }
        base_qps = None
        for name, fn in runs.items():
            t0 = time.perf_counter()
            acc = fn()
            wall = time.perf_counter() - t0
            if acc is None:
                continue
            qps = n / wall
            base_qps = base_qps or qps
            print(f"{name:<56} {qps:>7.2f} q/s  {qps / base_qps:>6.2f}x  accuracy {acc:.3f}")
            figures.add(
                "eval",
                name,
                questions=n,
                few_shot=few,
                qps=qps,
                ratio_to_loop=qps / base_qps,
                accuracy=acc,
            )
