"""eval.py --summary: results over seeds as mean ± sd, runs grouped by everything in their config but seed and out_dir,
with each seed's gates at the end of training."""
import json

import numpy as np
import pytest

import eval as evaluation
from common import configure
from userllm import DEFAULTS


def run_dir(path, seed, recall, gate=0.5, **cfg):
    path.mkdir()
    c = configure(DEFAULTS, [f"--{k}={v}" for k, v in cfg.items()] + ["--encoder_ckpt=enc.pt", f"--seed={seed}",
                                                                        f"--out_dir={path}"])
    (path / "config.json").write_text(json.dumps(vars(c)))
    (path / "log.jsonl").write_text(json.dumps({"step": 0, "val_loss": 1.0}) + "\n" + json.dumps(
        {"step": 10, "loss": 0.5, "attn0": gate, "ff0": -gate}) + "\n")
    (path / "eval_test.json").write_text(json.dumps({"results": {"model": {"recall@10": recall, "recall@1": recall / 4},
                                                                 "most popular": {"recall@10": 0.07}}}))


def test_summary_groups_seeds_and_reports_mean_and_sd(tmp_path, capsys):
    for seed, r in zip((1, 2, 3), (0.2, 0.3, 0.4)):
        run_dir(tmp_path / f"user-s{seed}", seed, r, gate=0.1 * seed)
    for seed, r in zip((1, 2), (0.05, 0.07)):
        run_dir(tmp_path / f"none-s{seed}", seed, r, fusion="none")
    run_dir(tmp_path / "enc-s1", 1, 0.25, strategy="full")  # another config: its own row
    groups = evaluation.main(["--summary=True", f"--runs={tmp_path}/user-s*,{tmp_path}/none-s*,{tmp_path}/enc-s1"])
    assert {k: len(v) for k, v in groups.items()} == {"User-LLM N=50 (enc)": 3, "no user context (enc)": 2,
                                                      "User-LLM N=50 (full)": 1}
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("User-LLM N=50 (enc)"))
    assert line.split()[3:] == ["3", f"{0.3:.4f}", "±", f"{np.std([0.2, 0.3, 0.4], ddof=1):.4f}",
                                f"{0.075:.4f}", "±", f"{np.std([0.05, 0.075, 0.1], ddof=1):.4f}"]
    assert "User-LLM N=50 (enc) seed 3: 0.4000  attn0 +0.30 ff0 -0.30" in out
    with pytest.raises(SystemExit, match="found no run matching"):
        evaluation.main(["--summary=True", f"--runs={tmp_path}/nothing*"])
    (tmp_path / "none-s1" / "eval_test.json").unlink()  # a run still training: counted and named, not averaged
    groups = evaluation.main(["--summary=True", f"--runs={tmp_path}/none-s*"])
    assert len(groups["no user context (enc)"]) == 1
    assert "skipped 1 runs without eval_test.json" in capsys.readouterr().out
    (tmp_path / "none-s2" / "eval_test.json").unlink()
    with pytest.raises(SystemExit, match="no evaluated run"):
        evaluation.main(["--summary=True", f"--runs={tmp_path}/none-s*"])
