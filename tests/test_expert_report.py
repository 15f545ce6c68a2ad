"""tools/expert_report.py on the demo model: per-label usage, distances, files, errors."""

import importlib.util
import json
import re

import numpy as np
import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("expert_report",
                                              REPO / "tools" / "expert_report.py")
expert_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(expert_report)


def test_js_distance_bounds():
    p = np.array([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    q = np.array([[0.0, 0.0, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(expert_report.js_distance(p, q), [1.0, 0.0], atol=1e-12)


def test_report_on_the_demo(tmp_path, capsys):
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("# label, tab, prompt\nshort\t1+2=\nshort\t3+4=\n\n"
                       "long\t123+456=\nlong\t987+654=\n")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = expert_report.main([str(prompts), "--json", str(out_json), "--plot", str(out_png)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "mean Jensen-Shannon distance" in printed.out
    data = json.loads(out_json.read_text())
    assert data["labels"] == ["short", "long"]
    short, long_ = (np.array(data["counts"][k]) for k in ("short", "long"))
    assert short.shape == (6, 8)
    assert (short.sum(-1) == 2 * 8).all() and (long_.sum(-1) == 2 * 16).all()  # 2 per token
    distance = np.array(data["distance"])
    assert distance[0, 0] == distance[1, 1] == 0 and distance[0, 1] == distance[1, 0] > 0
    assert out_png.stat().st_size > 1000


@pytest.mark.parametrize("text, message", [
    ("no tab here\n", r"prompts.tsv:1: expected LABEL<TAB>PROMPT"),
    ("# only a comment\n", r"no prompts"),
])
def test_bad_prompts_file(tmp_path, capsys, text, message):
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text(text)
    assert expert_report.main([str(prompts)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.search(message, err)
