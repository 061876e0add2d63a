"""report.py: results over seeds as mean ± sd, the paper's Fig. 3, loss curves and time to quality
as SVG (parsed back and checked against the runs they were drawn from), and --catalogue: what a GPT
without user context knows of the catalogue."""
import dataclasses
import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

import data
import encoder
import report
from common import save_checkpoint
from config import UserError, configure
from conftest import tiny_llm as tiny
from data import Prompter, get_tokenizer
from userllm import DEFAULTS, build_model


SVG = "{http://www.w3.org/2000/svg}"


def fake_run(path, recall, losses, cpu_per_step=None, **cfg):
    """An out_dir as train_llm.py + eval.py leave it: config.json, log.jsonl (with training
    CPU-seconds if cpu_per_step) and eval_test.json."""
    path.mkdir()
    c = configure(DEFAULTS, [f"--{k}={v}" for k, v in cfg.items()] + ["--encoder_ckpt=enc.pt"])
    (path / "config.json").write_text(json.dumps(vars(c)))
    cpu = lambda step: {"cpu_s": cpu_per_step * step} if cpu_per_step else {}
    rows = [json.dumps({"step": 20 * i, "loss": x, **cpu(20 * i)}) + "\n"
            for i, x in enumerate(losses)]
    (path / "log.jsonl").write_text("".join(rows))
    (path / "eval_test.json").write_text(json.dumps(
        {"results": {"model": {"recall@10": recall}, "most popular": {"recall@10": 0.07}}}))
    return str(path)


def polylines(path, panel=0):
    """{title: [(x, y) pixels]} of the lines in one panel of an SVG file (0: the leftmost)."""
    root = ET.parse(path).getroot()
    g = next(g for g in root.iter(SVG + "g") if g.get("id") == f"panel{panel}")
    return {p.find(SVG + "title").text: [tuple(map(float, xy.split(",")))
                                         for xy in p.get("points").split()]
            for p in g.iter(SVG + "polyline")}


def colour(path, panel, title):
    """The stroke colour of the line with this title in one panel."""
    g = next(g for g in ET.parse(path).getroot().iter(SVG + "g") if g.get("id") == f"panel{panel}")
    return next(p.get("stroke") for p in g.iter(SVG + "polyline")
                if p.find(SVG + "title").text == title)


def test_fig3_draws_one_line_per_method_in_order_of_length(tmp_path):
    runs = [fake_run(tmp_path / "u50", 0.20, [3, 1], 0.64, seq_len=50, batch_size=64),
            fake_run(tmp_path / "u10", 0.12, [3, 1], seq_len=10),
            fake_run(tmp_path / "t10", 0.09, [3, 2], 1.6, fusion="none", text_events=10,
                     batch_size=8, grad_accum=4),
            fake_run(tmp_path / "t5", 0.10, [3, 2], fusion="none", text_events=5),
            fake_run(tmp_path / "u10s7", 0.16, [3, 1], 0.32, seq_len=10, seed=7, batch_size=64)]
    series, table = report.plot_fig3(runs, str(tmp_path / "fig3.svg"))
    # training cost per example: CPU-seconds at the last step / (steps x batch x grad_accum)
    cost = {(r["method"], r["N"]): r["cost"] for r in table}
    assert cost[("User-LLM (enc)", 50)] == pytest.approx(10.0)  # 0.64 s / 64 examples
    assert cost[("TextPrompt", 10)] == pytest.approx(50.0)  # 1.6 s / 32 examples
    assert cost[("TextPrompt", 5)] is None  # a log without cpu_s: no cost, no crash
    assert cost[("User-LLM (enc)", 10)] == pytest.approx(5.0)  # the seed with a cost
    # the seeds of a method at one N are one point, their mean; the table has their spread
    assert series == {"User-LLM (enc)": ((10, 50), (pytest.approx(0.14), 0.20)),
                      "TextPrompt": ((5, 10), (0.10, 0.09))}
    spread = {(r["method"], r["N"]): (r["seeds"], r["sd"]) for r in table}
    assert spread[("User-LLM (enc)", 10)] == (2, pytest.approx(0.0283, abs=1e-4))
    assert spread[("TextPrompt", 5)] == (1, None)
    # --runs takes glob patterns: the same runs, the same figure
    report.main([f"--runs={tmp_path}/u*,{tmp_path}/t*", f"--fig3={tmp_path / 'glob.svg'}"])
    assert (tmp_path / "glob.svg").read_text() == (tmp_path / "fig3.svg").read_text()
    lines = polylines(tmp_path / "fig3.svg")
    (ua, ub), (ta, tb) = lines["User-LLM (enc)"], lines["TextPrompt"]
    # N grows to the right; the higher recall is drawn higher (smaller y)
    assert ua[0] < ub[0] and ua[1] > ub[1]
    assert ta[0] < tb[0] == ua[0] and ta[1] < tb[1]
    assert ta[1] > ua[1]  # TextPrompt's 0.10 is drawn below User-LLM's 0.12
    # the second panel: the cost at each N that has one, each method in its first panel's colour
    costs = polylines(tmp_path / "fig3.svg", panel=1)
    assert len(costs["User-LLM (enc)"]) == 2 and len(costs["TextPrompt"]) == 1  # TP5: no cost
    (c10, c50), (t10,) = costs["User-LLM (enc)"], costs["TextPrompt"]
    assert c10[0] < c50[0] and c10[1] > c50[1] > t10[1]  # 5 < 10 < 50 CPU-ms, drawn upwards
    for method in ("User-LLM (enc)", "TextPrompt"):
        assert colour(tmp_path / "fig3.svg", 0, method) == colour(tmp_path / "fig3.svg", 1, method)
    report.plot_fig3([runs[3], runs[0]], str(tmp_path / "one.svg"))  # TextPrompt without a cost
    assert list(polylines(tmp_path / "one.svg", panel=1)) == ["User-LLM (enc)"]
    assert colour(tmp_path / "one.svg", 1, "User-LLM (enc)") == colour(
        tmp_path / "one.svg", 0, "User-LLM (enc)") != colour(tmp_path / "one.svg", 0, "TextPrompt")
    with pytest.raises(UserError, match="recall@20"):
        report.plot_fig3(runs, str(tmp_path / "x.svg"), metric="recall@20")
    (tmp_path / "u10" / "eval_test.json").unlink()
    with pytest.raises(UserError, match="no eval_test.json"):
        report.plot_fig3(runs, str(tmp_path / "x.svg"))
    with pytest.raises(UserError, match="not a training run"):
        report.plot_fig3([str(tmp_path)], str(tmp_path / "x.svg"))
    encoder = fake_run(tmp_path / "enc", 0.5, [3, 1])
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    enc_config = {k: config[k] for k in ("seq_len", "seed")} | {"kind": "ar"}
    (tmp_path / "enc" / "config.json").write_text(json.dumps(enc_config))
    with pytest.raises(UserError, match="encoder's"):
        report.plot_fig3([encoder], str(tmp_path / "x.svg"))


def test_loss_curves_follow_the_logs(tmp_path):
    runs = [fake_run(tmp_path / "a", 0.2, [4.0, 2.0, 1.0, 0.5], seq_len=50),
            fake_run(tmp_path / "b", 0.1, [4.0, 3.0, 2.0, 1.5], fusion="none")]
    report.main([f"--runs={','.join(runs)}", f"--curves={tmp_path / 'loss.svg'}"])
    lines = polylines(tmp_path / "loss.svg")
    a, b = lines["User-LLM N=50 (enc)"], lines["no user context (enc)"]
    assert len(a) == len(b) == 4 and a[0] == b[0]  # same start (step 0, loss 4)
    # falling loss is drawn going down (y grows)
    assert [p[1] for p in a] == sorted(p[1] for p in a)
    # log scale: equal ratios are equal distances (4 -> 2 -> 1 -> 0.5)
    assert (a[1][1] - a[0][1] == pytest.approx(a[2][1] - a[1][1], abs=0.2)
            == pytest.approx(a[3][1] - a[2][1], abs=0.2))
    # b's higher loss is drawn higher
    assert all(y_b < y_a for (_, y_a), (_, y_b) in zip(a[1:], b[1:]))
    (tmp_path / "a" / "log.jsonl").write_text('{"step": 0, "val_loss": 4.0}\n')
    with pytest.raises(UserError, match="no training loss"):
        report.plot_curves(runs, str(tmp_path / "x.svg"))


def test_ticks_are_round():
    assert report.ticks(0.0, 0.21) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert report.ticks(0, 1000) == pytest.approx([0, 200, 400, 600, 800, 1000])
    assert report.ticks(0.21, 3.2, log=True) == pytest.approx([0.3, 0.5, 1, 2, 3])


def test_labels_are_escaped(tmp_path):
    report.svg_chart(str(tmp_path / "x.svg"), {"TP<10> & co": ((1, 2), (0.1, 0.2))}, "a & b",
                     "N < 5", "y")
    # parses, and the label reads back as written
    assert list(polylines(tmp_path / "x.svg")) == ["TP<10> & co"]


def encoder_run(path, kind, seed, rows):
    """An out_dir as train_encoder.py leaves it: config.json and log.jsonl (rows written as
    given)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**encoder.DEFAULTS, "kind": kind, "seed": seed}))
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_time_to_quality_plots_validation_recall_against_cpu_seconds(tmp_path):
    val = lambda step, cpu_s, r: {"step": step, "val_recall@10": r, "val_ndcg@10": r / 2,
                                  "cpu_s": cpu_s}
    train = lambda step, cpu_s: {"step": step, "loss": 5.0, "lr": 1e-3, "units_per_s": 1.0,
                                 "cpu_s": cpu_s}
    ar = encoder_run(tmp_path / "ar", "ar", 1337,
                     [val(0, 0.0, 0.01), train(20, 50.0), val(100, 240.0, 0.08),
                      train(120, 290.0), val(200, 480.0, 0.12)])
    b4r = encoder_run(tmp_path / "b4r", "bert4rec", 2, [val(0, 0.0, 0.01), val(100, 240.0, 0.05)])
    report.main([f"--runs={ar},{b4r}", f"--time_to_quality={tmp_path / 't.svg'}"])
    assert report.plot_time_to_quality([ar, b4r], str(tmp_path / "t2.svg")) == {
        # validation rows only, at their CPU-seconds
        "ar encoder": ((0.0, 240.0, 480.0), (0.01, 0.08, 0.12)),
        "bert4rec encoder seed 2": ((0.0, 240.0), (0.01, 0.05))}
    lines = polylines(tmp_path / "t.svg")
    a, b = lines["ar encoder"], lines["bert4rec encoder seed 2"]
    # same start, same x at 240 s
    assert len(a) == 3 and len(b) == 2 and a[0] == b[0] and a[1][0] == b[1][0]
    # time to the right, recall going up
    assert a[0][0] < a[1][0] < a[2][0] and a[0][1] > a[1][1] > a[2][1]
    assert b[1][1] > a[1][1]  # Bert4Rec's 0.05 at 240 s is drawn below the AR encoder's 0.08
    assert a[2][0] - a[1][0] == pytest.approx(a[1][0] - a[0][0])  # a linear time axis
    assert report.plot_time_to_quality([ar], str(tmp_path / "n.svg"),
                                       metric="ndcg@10")["ar encoder"][1] == (0.005, 0.04, 0.06)
    (tmp_path / "b4r" / "log.jsonl").write_text(json.dumps({"step": 0, "val_recall@10": 0.01})
                                                + "\n")
    with pytest.raises(UserError, match="no validation recall@10 with cpu_s"):
        report.plot_time_to_quality([ar, b4r], str(tmp_path / "x.svg"))


def run_dir(path, seed, recall, gate=0.5, **cfg):
    path.mkdir()
    c = configure(DEFAULTS, [f"--{k}={v}" for k, v in cfg.items()]
                  + ["--encoder_ckpt=enc.pt", f"--seed={seed}", f"--out_dir={path}"])
    (path / "config.json").write_text(json.dumps(vars(c)))
    (path / "log.jsonl").write_text(json.dumps({"step": 0, "val_loss": 1.0}) + "\n" + json.dumps(
        {"step": 10, "loss": 0.5, "attn0": gate, "ff0": -gate}) + "\n")
    (path / "eval_test.json").write_text(json.dumps(
        {"results": {"model": {"recall@10": recall, "recall@1": recall / 4},
                     "most popular": {"recall@10": 0.07}}}))


def test_summary_groups_seeds_and_reports_mean_and_sd(tmp_path, capsys):
    for seed, r in zip((1, 2, 3), (0.2, 0.3, 0.4)):
        run_dir(tmp_path / f"user-s{seed}", seed, r, gate=0.1 * seed)
    for seed, r in zip((1, 2), (0.05, 0.07)):
        run_dir(tmp_path / f"none-s{seed}", seed, r, fusion="none")
    run_dir(tmp_path / "enc-s1", 1, 0.25, strategy="full")  # another config: its own row
    groups = report.main(["--summary=True",
                          f"--runs={tmp_path}/user-s*,{tmp_path}/none-s*,{tmp_path}/enc-s1"])
    assert {k: len(v) for k, v in groups.items()} == {"User-LLM N=50 (enc)": 3,
                                                      "no user context (enc)": 2,
                                                      "User-LLM N=50 (full)": 1}
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("User-LLM N=50 (enc)"))
    assert line.split()[3:] == ["3", f"{0.3:.4f}", "±", f"{np.std([0.2, 0.3, 0.4], ddof=1):.4f}",
                                f"{0.075:.4f}", "±", f"{np.std([0.05, 0.075, 0.1], ddof=1):.4f}"]
    assert "User-LLM N=50 (enc) seed 3: 0.4000  attn0 +0.30 ff0 -0.30" in out
    with pytest.raises(UserError, match="no run matches"):
        report.main(["--summary=True", f"--runs={tmp_path}/nothing*"])
    # a run still training: counted and named, not averaged
    (tmp_path / "none-s1" / "eval_test.json").unlink()
    groups = report.main(["--summary=True", f"--runs={tmp_path}/none-s*"])
    assert len(groups["no user context (enc)"]) == 1
    assert "skipped 1 runs without eval_test.json" in capsys.readouterr().out
    (tmp_path / "none-s2" / "eval_test.json").unlink()
    with pytest.raises(UserError, match="no evaluated run"):
        report.main(["--summary=True", f"--runs={tmp_path}/none-s*"])


def test_rows_that_share_a_name_are_told_apart(tmp_path, capsys, monkeypatch):
    """Runs whose configs differ in more than their seed never share a row: where the names match,
    the keys that differ are named; a User-LLM run on a Dual Encoder says so (its encoder run's
    config.json), and its seeds still make one row, also where one run predates a key."""
    monkeypatch.chdir(tmp_path)
    for seed in (1, 2):
        run_dir(tmp_path / f"wide-s{seed}", seed, 0.3)
        run_dir(tmp_path / f"narrow-s{seed}", seed, 0.2, xattn_dim=8)
        run_dir(tmp_path / f"dual-s{seed}", seed, 0.1)
        (tmp_path / f"dual-enc-s{seed}").mkdir()
        (tmp_path / f"dual-enc-s{seed}" / "config.json").write_text(json.dumps({"kind": "dual"}))
        c = json.loads((tmp_path / f"dual-s{seed}" / "config.json").read_text())
        c["encoder_ckpt"] = f"dual-enc-s{seed}/best.pt"
        if seed == 2:  # a run from before a key existed ran with its default: the same row
            del c["llm_positions"], c["enc_feature_dims"]  # (a tuple default, a list in JSON)
        (tmp_path / f"dual-s{seed}" / "config.json").write_text(json.dumps(c))
    groups = report.main(["--summary=True", "--runs=wide-s*,narrow-s*,dual-s*"])
    assert {k: [s for s, _, _ in v] for k, v in groups.items()} == {
        "User-LLM N=50 (enc) [xattn_dim=0]": [1, 2], "User-LLM N=50 (enc) [xattn_dim=8]": [1, 2],
        "User-LLM N=50 (enc) with the dual encoder": [1, 2]}
    (tmp_path / "dual-enc-s1" / "config.json").write_text("{")  # damaged: one line, no traceback
    with pytest.raises(UserError, match=r"dual-enc-s1/config.json: not a training run's config"):
        report.main(["--summary=True", "--runs=dual-s*"])


def test_average_ranks_share_ties():
    assert (report.average_ranks(np.array([5.0, 1.0, 5.0, 3.0, 5.0])).tolist()
            == [3.0, 0.0, 3.0, 1.0, 3.0])


def test_catalogue_fit_of_a_gpt_without_context(small, tmp_path, monkeypatch):
    """report.py --catalogue: the probability the titles hold after the query equals a brute-force
    sum over the catalogue; a GPT whose title log-probabilities follow the training counts scores
    Spearman 1 and 10 of 10, and its one list's Recall on every test user is most popular's; a model
    with user context, or an encoder, is refused in one line."""
    torch.manual_seed(0)
    tok, cfg = get_tokenizer("scratch"), tiny(fusion="none", strategy="full")
    m = build_model(cfg, small, tok).eval()
    ckpt = {"model": m.state_dict(), "data": small.fingerprint(), "config": vars(cfg),
            "encoder_config": None, "llm_config": dataclasses.asdict(m.llm.config)}
    save_checkpoint(ckpt, str(tmp_path / "gpt.pt"))
    catalogue = [f"--catalogue={tmp_path / 'gpt.pt'}"]
    fit = report.main(catalogue)
    p = Prompter(small, tok, "next_item", 0, 512, 64)
    prompt = p.prompts(small.targets("train")[:1])[0]
    mass = 0.0
    with torch.no_grad():
        for a in p.answers[1:]:
            logp = torch.log_softmax(m.llm(torch.tensor([prompt + a]))[0][0], -1)
            mass += math.exp(sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(a)))
    assert fit["catalogue mass"] == pytest.approx(mass, rel=1e-4) and 0 < mass < 1
    counts = torch.tensor(data.popularity(small)[1:])
    monkeypatch.setattr(report, "answer_logprobs", lambda *a, **k: torch.log(counts + 1)[None])
    fit = report.main(catalogue)
    assert fit["spearman vs counts"] == pytest.approx(1.0) and fit["top-10 overlap"] == 10
    # ranked as most popular ranks, its one list scores what most popular scores, on every test user
    assert fit["examples"] == len(small.targets("test"))
    assert fit["rows"]["its one list"] == fit["rows"]["most popular"]
    monkeypatch.setattr(report, "answer_logprobs", lambda *a, **k: -torch.log(counts + 1)[None])
    # the least watched first: worse than most popular
    fit = report.main(catalogue + ["--split=val"])
    assert fit["rows"]["its one list"]["recall@10"] < fit["rows"]["most popular"]["recall@10"]
    user = build_model(tiny(), small, tok)
    save_checkpoint({**ckpt, "model": user.state_dict(), "config": vars(tiny())},
                    str(tmp_path / "user.pt"))
    with pytest.raises(UserError,
                       match="needs an LLM trained without user context.*user.pt is not one"):
        report.main([f"--catalogue={tmp_path / 'user.pt'}"])
    save_checkpoint({"model": {}, "config": {"kind": "ar"}, "encoder_config": {}},
                    str(tmp_path / "enc.pt"))
    with pytest.raises(UserError, match="enc.pt is not one"):
        report.main([f"--catalogue={tmp_path / 'enc.pt'}"])
