"""``prunekit eval --tasks`` (issue 19 item 5): lm-evaluation-harness on the model in memory, offline, with
a small multiple-choice task on a local JSON-lines file defined here, on a tiny random Llama and on a
per-layer-width checkpoint that only ``load_pruned`` reloads. Accuracies are checked against the same
log-likelihoods computed by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer, words

import prunekit_core as pk
from prunekit_core.cli import main

needs_lmeval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval absent: install it with pip install -e '.[lmeval]' (scripts/setup.sh does)",
)

TASK = "prunekit_tiny_mc"


def make_task(folder: Path, docs: int = 12) -> Path:
    """A multiple-choice task over the tiny vocabulary: a 6-word question, 3 one-word choices."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(docs):
        q = torch.randint(0, 100, (6,), generator=g).tolist()
        ch = torch.randint(0, 100, (3,), generator=g).tolist()
        rows.append({"question": " ".join(f"w{i}" for i in q), "choices": [f"w{i}" for i in ch], "answer": 1})
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    return folder


def hand_accuracy(model: torch.nn.Module, task_dir: Path, limit: int | None = None) -> float:
    """The accuracy lm-eval should report: argmax over choices of log P(" choice" | question)."""
    tok = tiny_tokenizer()
    rows = [json.loads(line) for line in (task_dir / "tiny_mc.jsonl").read_text().splitlines()]
    rows = rows[:limit] if limit else rows
    hits = 0
    with torch.inference_mode():
        for r in rows:
            ctx = tok(r["question"], add_special_tokens=False).input_ids
            scores = []
            for c in r["choices"]:
                cont = tok(" " + c, add_special_tokens=False).input_ids
                ids = torch.tensor([ctx + cont])
                logp = model(input_ids=ids[:, :-1], use_cache=False).logits.log_softmax(-1)[0]
                scores.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
            hits += int(max(range(len(scores)), key=scores.__getitem__) == r["answer"])
    return hits / len(rows)


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_lmeval
def test_tasks_on_a_tiny_llama_match_hand_computed_accuracy(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from prunekit_core.study.lmeval import run_tasks

    tasks = make_task(tmp_path)
    model = tiny_llama(layers=2, seed=3)
    res = run_tasks(model, tiny_tokenizer(), [TASK], include_path=tasks, batch_size=2)
    acc = res["results"][TASK]["acc,none"]
    assert acc == pytest.approx(hand_accuracy(model, tasks))
    assert res["n_samples"][TASK]["effective"] == 12
    limited = run_tasks(model, tiny_tokenizer(), [TASK], include_path=tasks, limit=5)
    assert limited["results"][TASK]["acc,none"] == pytest.approx(hand_accuracy(model, tasks, limit=5))


def width_pruned_folder(tmp_path: Path) -> Path:
    """A 3-block Llama with a different FFN width in every block: only load_pruned rebuilds it."""
    model = tiny_llama(layers=3, seed=4)
    groups = {f"text.blocks.{i}.mlp.channels": list(range(8 * (i + 1))) for i in range(3)}
    plan = pk.PrunePlan(fingerprint=pk.fingerprint(model, pk.inspect(model)), remove=[], remove_groups=groups)
    applied = pk.apply_plan(model, plan)
    assert not applied.plan.is_uniform
    return pk.save_pruned(model, tmp_path / "pruned", tokenizer=tiny_tokenizer(), plan=applied.plan)


@needs_lmeval
def test_cli_tasks_on_a_load_pruned_width_checkpoint(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    folder = width_pruned_folder(tmp_path)
    tasks = make_task(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text(words(400, seed=1) + "\n")
    record = tmp_path / "eval.json"
    code, out, err = run(
        capsys, "eval", folder, "--text", text, "--seq-len", "16", "--windows", "2", "--tasks", TASK,
        "--include-path", tasks, "--save", record, "--json",
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert json.loads(record.read_text()) == data  # the record saved is the one printed
    assert data["perplexity"] > 0 and data["tasks"]["limit"] is None
    want = hand_accuracy(pk.load_pruned(folder), tasks)
    assert data["tasks"]["results"][TASK]["acc,none"] == pytest.approx(want)
    # tasks alone, human output
    code, out, err = run(capsys, "eval", folder, "--tasks", TASK, "--include-path", tasks, "--limit", "4")
    assert code == 0, err
    assert f"{TASK}: acc {hand_accuracy(pk.load_pruned(folder), tasks, limit=4):.4f}" in out
    assert "perplexity" not in out


@needs_lmeval
def test_bad_task_inputs_are_clear_errors(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    folder = tmp_path / "m"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    tasks = make_task(tmp_path)
    # the one check that indexes lm-eval's built-in tasks (a name not among the local ones): ~20 s of CPU
    code, _, err = run(capsys, "eval", folder, "--tasks", f"{TASK},no_such_task_xyz", "--include-path", tasks)
    assert code == 2 and "lm-eval knows no task no_such_task_xyz or in" in err
    code, _, err = run(capsys, "eval", folder)
    assert code == 2 and "nothing to evaluate" in err
    code, _, err = run(capsys, "eval", folder, "--tasks", TASK, "--include-path", tmp_path / "none")
    assert code == 2 and "is not a folder" in err
    bad = ["--tasks", TASK, "--include-path", tasks, "--save", tmp_path / "nowhere" / "e.json"]
    code, _, err = run(capsys, "eval", folder, *bad)
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "nowhere").exists()


def test_missing_extra_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:  # noqa: ANN001
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    folder = tmp_path / "m"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    code, _, err = run(capsys, "eval", folder, "--tasks", "arc_easy")
    assert code == 2 and "pip install -e '.[lmeval]'" in err
