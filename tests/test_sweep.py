"""prunekit sweep / report on a tiny random model: config validation, store, resume after a real kill."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from helpers import save_tiny_model, words

from prunekit_core.cli import main
from prunekit_core.study.report import pareto_front, write_report
from prunekit_core.study.sweep import (
    Cell,
    SweepConfigError,
    load_sweep_config,
    plan_cells,
    read_results,
    run_sweep,
    validate_sweep_config,
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("sweep")
    model = save_tiny_model(d / "tiny", layers=4)
    calib = d / "calib.txt"
    calib.write_text(words(600, seed=1))
    ev = d / "eval.txt"
    ev.write_text(words(600, seed=2))
    return {"model": str(model), "calib": str(calib), "eval": str(ev), "dir": str(d)}


def config(assets: dict[str, str], **over) -> dict:
    cfg = {
        "model": assets["model"],
        "calibration": {"text": assets["calib"], "seq_len": 32, "windows": 4},
        "evaluation": {"text": assets["eval"], "seq_len": 32, "windows": 4},
        "methods": ["bi"],
        "ratios": [0, 0.25],
        "formats": ["none", "mxfp4", "int4_g32"],
    }
    cfg.update(over)
    return cfg


def test_grid_runs_ratio_zero_once_per_format(assets):
    cfg = validate_sweep_config(config(assets, methods=["bi", "best"]))
    keys = [c.key for c in plan_cells(cfg)]
    assert keys[:3] == ["none|0|none", "none|0|mxfp4", "none|0|int4_g32"]
    assert len(keys) == 3 + 2 * 3 and len(set(keys)) == len(keys)
    assert cfg.methods[1].metric is None and cfg.methods[0].metric == "bi"


@pytest.mark.parametrize(
    "over,field",
    [
        ({"ratios": [0.1, 1.5]}, "ratios"),
        ({"formats": ["none", "mxfp_4"]}, "formats"),
        ({"evaluation": {"text": "wiki", "seq_len": 1}}, "evaluation.seq_len"),
        ({"methods": []}, "methods"),
        ({"metods": ["bi"]}, "metods"),
        ({"quantize": {"embeddings": "sometimes"}}, "quantize.embeddings"),
    ],
)
def test_malformed_config_names_the_field(assets, over, field):
    with pytest.raises(SweepConfigError) as exc:
        validate_sweep_config(config(assets, **over))
    assert f"  {field}" in str(exc.value)


def test_unknown_format_error_suggests_the_near_miss(assets):
    with pytest.raises(SweepConfigError, match="mxfp4"):
        validate_sweep_config(config(assets, formats=["mxfp_4"]))


def test_yaml_and_json_configs_load(assets, tmp_path):
    import yaml

    y = tmp_path / "s.yaml"
    y.write_text(yaml.safe_dump(config(assets)))
    j = tmp_path / "s.json"
    j.write_text(json.dumps(config(assets)))
    assert load_sweep_config(y) == load_sweep_config(j)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(SweepConfigError, match="not valid YAML"):
        load_sweep_config(bad)


def test_serial_sweep_rows_sizes_and_resume(assets, tmp_path):
    cfg = validate_sweep_config(config(assets))
    db = tmp_path / "r.sqlite"
    seen = []
    s1 = run_sweep(cfg, db, executor="serial", on_row=lambda r, d, t: seen.append((r["cell"], d, t)))
    assert s1["written"] == 6 and [d for _, d, _ in seen] == [1, 2, 3, 4, 5, 6]
    rows = {r["cell"]: r for r in read_results(db)}
    base = rows["none|0|none"]
    assert base["bits_per_param"] == 16 and base["removed"] == []
    pruned = rows["bi|0.25|none"]
    assert pruned["removed"] and pruned["params"] < base["params"]
    assert pruned["bits_per_param"] == pytest.approx(16 * pruned["params"] / base["params"])
    # quantizing blocks lowers bits; embeddings stay at 16 bits (not in scope)
    assert rows["none|0|mxfp4"]["bits_per_param"] < 16
    assert rows["none|0|mxfp4"]["size"]["bits"]["embeddings"] == 128 * 32 * 16
    assert rows["none|0|mxfp4"]["perplexity"] != base["perplexity"]
    # a second run skips everything; extending the grid runs only the new cells
    assert run_sweep(cfg, db, executor="serial")["written"] == 0
    more = validate_sweep_config(config(assets, formats=["none", "mxfp4", "int4_g32", "mxfp8_e4m3"]))
    assert run_sweep(more, db, executor="serial")["written"] == 2
    assert len(read_results(db)) == 8


def test_changed_identity_is_refused(assets, tmp_path):
    db = tmp_path / "r.sqlite"
    run_sweep(validate_sweep_config(config(assets, ratios=[0], formats=["none"])), db, executor="serial")
    other = config(assets, ratios=[0], formats=["none"])
    other["evaluation"]["windows"] = 2
    with pytest.raises(SweepConfigError, match="different evaluation"):
        run_sweep(validate_sweep_config(other), db, executor="serial")


def test_local_pool_matches_serial(assets, tmp_path):
    cfg = validate_sweep_config(config(assets))
    run_sweep(cfg, tmp_path / "a.sqlite", executor="serial")
    run_sweep(cfg, tmp_path / "b.sqlite", executor="local", workers=2)
    a = {r["cell"]: r for r in read_results(tmp_path / "a.sqlite")}
    b = {r["cell"]: r for r in read_results(tmp_path / "b.sqlite")}
    assert a.keys() == b.keys()
    assert len({r["worker"] for r in b.values()}) >= 1
    for k in a:
        assert b[k]["perplexity"] == pytest.approx(a[k]["perplexity"], rel=1e-4)
        assert b[k]["total_bits"] == a[k]["total_bits"]


def test_ray_executor_matches_serial(assets, tmp_path):
    pytest.importorskip("ray", reason="ray absent: install it with pip install -e '.[ray]' (optional)")
    cfg = validate_sweep_config(config(assets, ratios=[0], formats=["none", "mxfp4"]))
    run_sweep(cfg, tmp_path / "a.sqlite", executor="serial")
    run_sweep(cfg, tmp_path / "b.sqlite", executor="ray", workers=2)
    a = {r["cell"]: r["perplexity"] for r in read_results(tmp_path / "a.sqlite")}
    b = {r["cell"]: r["perplexity"] for r in read_results(tmp_path / "b.sqlite")}
    assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], rel=1e-4) for k in a)


def test_ray_executor_without_ray_says_how_to_install(assets, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    cfg = validate_sweep_config(config(assets, ratios=[0], formats=["none"]))
    with pytest.raises(Exception, match=r"prunekit-core\[ray\]"):
        run_sweep(cfg, tmp_path / "r.sqlite", executor="ray")


def test_killed_sweep_resumes_without_losing_or_duplicating_rows(assets, tmp_path):
    cfg_path = tmp_path / "sweep.json"
    cfg_path.write_text(json.dumps(config(assets, ratios=[0, 0.25, 0.5])))
    db = tmp_path / "r.sqlite"
    cmd = [sys.executable, "-m", "prunekit_core.cli", "sweep", str(cfg_path), "--results", str(db)]
    env = dict(os.environ, PRUNEKIT_SWEEP_CELL_DELAY="0.4", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [*cmd, "--executor", "serial"], env=env, start_new_session=True, stderr=subprocess.PIPE
    )

    def count() -> int:
        if not db.exists():
            return 0
        with sqlite3.connect(db) as c:
            try:
                return c.execute("SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.OperationalError:
                return 0

    deadline = time.time() + 120
    while count() < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {r["cell"]: r["finished_at"] + r["worker"] for r in read_results(db)}
    total = len(plan_cells(load_sweep_config(cfg_path)))
    assert 2 <= len(first) < total, "the kill must land mid-sweep"
    # resume with the process pool: only the missing cells run, earlier rows are untouched
    env.pop("PRUNEKIT_SWEEP_CELL_DELAY")
    done = subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["skipped"] == len(first) and summary["written"] == total - len(first)
    rows = read_results(db)
    assert len(rows) == total and len({r["cell"] for r in rows}) == total
    assert all(first[r["cell"]] == r["finished_at"] + r["worker"] for r in rows if r["cell"] in first)


def test_pareto_front_by_hand():
    rows = [
        {"cell": "a", "bits_per_param": 16.0, "perplexity": 10.0},
        {"cell": "b", "bits_per_param": 8.0, "perplexity": 10.5},
        {"cell": "c", "bits_per_param": 8.5, "perplexity": 11.0},  # dominated by b
        {"cell": "d", "bits_per_param": 4.0, "perplexity": 20.0},
        {"cell": "e", "bits_per_param": 3.0, "perplexity": None},  # infinite: never on the front
        {"cell": "f", "bits_per_param": 16.0, "perplexity": 10.0},  # ties a: neither dominates
    ]
    assert [r["cell"] for r in pareto_front(rows)] == ["d", "b", "a", "f"]


def test_cli_sweep_and_report(assets, tmp_path, capsys):
    import yaml

    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(config(assets)))
    db = tmp_path / "r.sqlite"
    assert main(["sweep", str(cfg), "--results", str(db), "--executor", "serial", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 6
    out = tmp_path / "rep"
    assert main(["report", str(db), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "Pareto front" in md and "mxfp4" in md and "bi 25%" in md
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    paths = write_report(db, tmp_path / "rep2", title="t")
    assert paths["plot"].exists()


def test_cli_errors_are_clear(assets, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(config(assets, ratios=[2])))
    assert main(["sweep", str(bad), "--results", str(tmp_path / "r.sqlite")]) == 2
    err = capsys.readouterr().err
    assert "  ratios: " in err and "ratio 2.0 is outside [0, 1)" in err
    assert main(["report", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "nope.yaml"), "--results", str(tmp_path / "r.sqlite")]) == 2
    assert Cell("bi", 0.1, "mxfp4").key == "bi|0.1|mxfp4"
