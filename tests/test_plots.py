"""eval.py's plots: Fig. 3 (a metric against history length, one line per method) and training-loss curves, written as
SVG by hand. The files are parsed back and their points checked against the runs they were drawn from."""
import json
import xml.etree.ElementTree as ET

import pytest

import eval as evaluation
from common import configure
from userllm import DEFAULTS

SVG = "{http://www.w3.org/2000/svg}"


def fake_run(path, recall, losses, **cfg):
    """An out_dir as train_llm.py + eval.py leave it: config.json, log.jsonl and eval_test.json."""
    path.mkdir()
    c = configure(DEFAULTS, [f"--{k}={v}" for k, v in cfg.items()] + ["--encoder_ckpt=enc.pt"])
    (path / "config.json").write_text(json.dumps(vars(c)))
    rows = [json.dumps({"step": 20 * i, "loss": x}) + "\n" for i, x in enumerate(losses)]
    (path / "log.jsonl").write_text("".join(rows))
    (path / "eval_test.json").write_text(json.dumps({"results": {"model": {"recall@10": recall},
                                                                 "most popular": {"recall@10": 0.07}}}))
    return str(path)


def polylines(path):
    """{title: [(x, y) pixels]} of an SVG file's lines."""
    root = ET.parse(path).getroot()
    return {p.find(SVG + "title").text: [tuple(map(float, xy.split(","))) for xy in p.get("points").split()]
            for p in root.iter(SVG + "polyline")}


def test_fig3_draws_one_line_per_method_in_order_of_length(tmp_path):
    runs = [fake_run(tmp_path / "u50", 0.20, [3, 1], seq_len=50), fake_run(tmp_path / "u10", 0.12, [3, 1], seq_len=10),
            fake_run(tmp_path / "t10", 0.09, [3, 2], fusion="none", text_events=10),
            fake_run(tmp_path / "t5", 0.10, [3, 2], fusion="none", text_events=5),
            fake_run(tmp_path / "u20", 0.05, [3, 2], seq_len=20, seed=7)]
    series = evaluation.plot_fig3(runs, str(tmp_path / "fig3.svg"))
    assert series == {"User-LLM (enc)": ((10, 50), (0.12, 0.20)), "TextPrompt": ((5, 10), (0.10, 0.09)),
                      "User-LLM (enc) seed 7": ((20,), (0.05,))}  # another seed is drawn apart, not averaged in
    lines = polylines(tmp_path / "fig3.svg")
    (ua, ub), (ta, tb) = lines["User-LLM (enc)"], lines["TextPrompt"]
    assert ua[0] < ub[0] and ua[1] > ub[1]  # N grows to the right; the higher recall is drawn higher (smaller y)
    assert ta[0] < tb[0] == ua[0] and ta[1] < tb[1]
    assert ta[1] > ua[1]  # TextPrompt's 0.10 is drawn below User-LLM's 0.12
    with pytest.raises(SystemExit, match="recall@20"):
        evaluation.plot_fig3(runs, str(tmp_path / "x.svg"), metric="recall@20")
    (tmp_path / "u10" / "eval_test.json").unlink()
    with pytest.raises(SystemExit, match="no eval_test.json"):
        evaluation.plot_fig3(runs, str(tmp_path / "x.svg"))
    with pytest.raises(SystemExit, match="not a training run"):
        evaluation.plot_fig3([str(tmp_path)], str(tmp_path / "x.svg"))
    encoder = fake_run(tmp_path / "enc", 0.5, [3, 1])
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    enc_config = {k: config[k] for k in ("seq_len", "seed")} | {"kind": "ar"}
    (tmp_path / "enc" / "config.json").write_text(json.dumps(enc_config))
    with pytest.raises(SystemExit, match="encoder's"):
        evaluation.plot_fig3([encoder], str(tmp_path / "x.svg"))


def test_loss_curves_follow_the_logs(tmp_path):
    runs = [fake_run(tmp_path / "a", 0.2, [4.0, 2.0, 1.0, 0.5], seq_len=50),
            fake_run(tmp_path / "b", 0.1, [4.0, 3.0, 2.0, 1.5], fusion="none")]
    evaluation.main([f"--runs={','.join(runs)}", f"--curves={tmp_path / 'loss.svg'}"])
    lines = polylines(tmp_path / "loss.svg")
    a, b = lines["User-LLM N=50 (enc)"], lines["no user context (enc)"]
    assert len(a) == len(b) == 4 and a[0] == b[0]  # same start (step 0, loss 4)
    assert [p[1] for p in a] == sorted(p[1] for p in a)  # falling loss is drawn going down (y grows)
    # log scale: equal ratios are equal distances (4 -> 2 -> 1 -> 0.5)
    assert a[1][1] - a[0][1] == pytest.approx(a[2][1] - a[1][1], abs=0.2) == pytest.approx(a[3][1] - a[2][1], abs=0.2)
    assert all(y_b < y_a for (_, y_a), (_, y_b) in zip(a[1:], b[1:]))  # b's higher loss is drawn higher
    (tmp_path / "a" / "log.jsonl").write_text('{"step": 0, "val_loss": 4.0}\n')
    with pytest.raises(SystemExit, match="no training loss"):
        evaluation.plot_curves(runs, str(tmp_path / "x.svg"))


def test_ticks_are_round():
    assert evaluation.ticks(0.0, 0.21) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert evaluation.ticks(0, 1000) == pytest.approx([0, 200, 400, 600, 800, 1000])
    assert evaluation.ticks(0.21, 3.2, log=True) == pytest.approx([0.3, 0.5, 1, 2, 3])


def test_labels_are_escaped(tmp_path):
    evaluation.svg_chart(str(tmp_path / "x.svg"), {"TP<10> & co": ((1, 2), (0.1, 0.2))}, "a & b", "N < 5", "y")
    assert list(polylines(tmp_path / "x.svg")) == ["TP<10> & co"]  # parses, and the label reads back as written


def encoder_run(path, kind, seed, rows):
    """An out_dir as train_encoder.py leaves it: config.json and log.jsonl (rows written as given)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"kind": kind, "seed": seed, "seq_len": 50}))
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_time_to_quality_plots_validation_recall_against_cpu_seconds(tmp_path):
    val = lambda step, cpu_s, r: {"step": step, "val_recall@10": r, "val_ndcg@10": r / 2, "cpu_s": cpu_s}
    train = lambda step, cpu_s: {"step": step, "loss": 5.0, "lr": 1e-3, "units_per_s": 1.0, "cpu_s": cpu_s}
    ar = encoder_run(tmp_path / "ar", "ar", 1337, [val(0, 0.0, 0.01), train(20, 50.0), val(100, 240.0, 0.08),
                                                    train(120, 290.0), val(200, 480.0, 0.12)])
    b4r = encoder_run(tmp_path / "b4r", "bert4rec", 2, [val(0, 0.0, 0.01), val(100, 240.0, 0.05)])
    evaluation.main([f"--runs={ar},{b4r}", f"--time_to_quality={tmp_path / 't.svg'}"])
    assert evaluation.plot_time_to_quality([ar, b4r], str(tmp_path / "t2.svg")) == {
        "ar encoder": ((0.0, 240.0, 480.0), (0.01, 0.08, 0.12)),  # validation rows only, at their CPU-seconds
        "bert4rec encoder seed 2": ((0.0, 240.0), (0.01, 0.05))}
    lines = polylines(tmp_path / "t.svg")
    a, b = lines["ar encoder"], lines["bert4rec encoder seed 2"]
    assert len(a) == 3 and len(b) == 2 and a[0] == b[0] and a[1][0] == b[1][0]  # same start, same x at 240 s
    assert a[0][0] < a[1][0] < a[2][0] and a[0][1] > a[1][1] > a[2][1]  # time to the right, recall going up
    assert b[1][1] > a[1][1]  # Bert4Rec's 0.05 at 240 s is drawn below the AR encoder's 0.08
    assert a[2][0] - a[1][0] == pytest.approx(a[1][0] - a[0][0])  # a linear time axis
    assert evaluation.plot_time_to_quality([ar], str(tmp_path / "n.svg"), metric="ndcg@10")["ar encoder"][1] == (
        0.005, 0.04, 0.06)
    (tmp_path / "b4r" / "log.jsonl").write_text(json.dumps({"step": 0, "val_recall@10": 0.01}) + "\n")
    with pytest.raises(SystemExit, match="no validation recall@10 with cpu_s"):
        evaluation.plot_time_to_quality([ar, b4r], str(tmp_path / "x.svg"))
