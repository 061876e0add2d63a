"""train_encoder.py: exact resume, validation apart from training, 2 processes equal 1, the NaN
stop, config errors before any write, checkpoints only with their own data; and the learning checks
on the synthetic default against its oracle (slow)."""
import json
import os

import pytest
import torch

import common as common_module
import data
import encoder
import eval as evaluation
import sources
import train_encoder
import train_llm
from common import load_checkpoint
from config import UserError
from conftest import ROOT, assert_same_runs, log_rows, losses, run_twice


def run_encoder(data_dir, out_dir, *args):
    train_encoder.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--n_layer=1",
                        "--n_embd=32", "--feature_dims=(16, 8, 8)", "--batch_size=16",
                        "--eval_examples=32", "--log_interval=1", *args])


@pytest.mark.parametrize("kind", ["ar", "bert4rec"])
def test_resume_is_exact(small300, tmp_path, kind):
    """6 steps == 3 steps + kill + resume + 3 steps, bit for bit (dropout on, and Bert4Rec's random
    masks), with the same log: no step twice, no validation lost; a killed save's temporary file is
    removed."""
    common = ["--dropout=0.2", "--lr_decay_steps=6", "--eval_interval=3", "--warmup_steps=2",
              f"--kind={kind}"]
    run_encoder(small300, tmp_path / "a", "--max_steps=6", *common)
    run_encoder(small300, tmp_path / "b", "--max_steps=3", *common)
    # a run killed after logging step 4, mid-save of a checkpoint
    with open(tmp_path / "b" / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n")
    (tmp_path / "b" / "ckpt.pt.tmp4242").write_bytes(b"half a checkpoint")
    run_encoder(small300, tmp_path / "b", "--max_steps=6", "--init_from=resume", *common)
    a, b = (load_checkpoint(str(tmp_path / x / "ckpt.pt")) for x in "ab")
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert log_rows(tmp_path / "a") == log_rows(tmp_path / "b")
    assert [r["step"] for r in log_rows(tmp_path / "a") if "val_loss" in r] == [0, 3, 6]
    assert sorted(os.listdir(tmp_path / "b")) == ["best.pt", "ckpt.pt", "config.json", "log.jsonl"]


def test_validation_does_not_change_training(small300, tmp_path):
    """How often a run validates changes none of its training steps: validation's random draws
    (Bert4Rec's cloze masks in its loss) are seeded apart from training's."""
    common = ["--kind=bert4rec", "--dropout=0.2", "--max_steps=6", "--warmup_steps=2"]
    run_encoder(small300, tmp_path / "a", "--eval_interval=3", *common)
    run_encoder(small300, tmp_path / "b", "--eval_interval=1", *common)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_resume_refuses_an_optimizer_state_of_other_parameter_groups(small300, tmp_path):
    """Resuming with the parameters split differently (here the seen bias's own learning rate; in
    train_llm.py another strategy) is a one-line error, not a traceback."""
    run_encoder(small300, tmp_path / "a", "--max_steps=1", "--seen_bias=True",
                "--seen_bias_lr_mult=1.0")
    with pytest.raises(UserError,
                       match="optimizer state does not fit this run's trained parameters"):
        run_encoder(small300, tmp_path / "a", "--max_steps=2", "--seen_bias=True",
                    "--init_from=resume")


BAD_VALUES = [("init_from", "latest", "one of 'scratch', 'resume'"), ("max_steps", -1, ">= 0"),
              ("batch_size", 0, ">= 1"), ("grad_accum", 0, ">= 1"), ("eval_interval", 0, ">= 1"),
              ("log_interval", 0, ">= 1"), ("seq_len", 0, ">= 1"), ("n_layer", 0, ">= 1"),
              ("n_layer", -1, ">= 1"), ("dropout", 2.0, r"in \[0, 1\)"),
              ("device", "foo", "one of 'auto'"), ("dtype", "int8", "one of 'auto'"),
              ("kind", "gru", "one of 'ar'")]


@pytest.mark.parametrize("key,value,allowed", BAD_VALUES)
def test_a_bad_value_is_one_line_and_nothing_is_written(small300, tmp_path, key, value, allowed):
    """Value ranges are checked with the config: one line naming the key, its value and the allowed
    range, before any work or any write."""
    with pytest.raises(UserError,
                       match=f"^config: {key}={value!r} is not allowed: it must be {allowed}"):
        run_encoder(small300, tmp_path / "a", f"--{key}={value}")
    assert not (tmp_path / "a").exists()


def test_nothing_is_written_before_the_config_is_valid(small300, tmp_path, monkeypatch):
    """A resume without a checkpoint, a GPU asked for on a machine without one, a grad_accum that
    torchrun's world size does not divide: one line, and out_dir untouched."""
    with pytest.raises(UserError, match="init_from='resume' but .*b/ckpt.pt does not exist"):
        run_encoder(small300, tmp_path / "b", "--init_from=resume")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device='cuda', but torch finds no CUDA GPU"):
            run_encoder(small300, tmp_path / "b", "--device=cuda")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node=2 sets it
    with pytest.raises(UserError, match="grad_accum=3 must divide batch_size=48 and be a "
                                        "multiple of the world size 2"):
        run_encoder(small300, tmp_path / "b", "--grad_accum=3", "--batch_size=48")
    assert not (tmp_path / "b").exists()


def test_a_kill_between_the_two_saves_leaves_no_stale_best(small300, tmp_path, monkeypatch):
    """Killed after the first of a validation's two saves (best.pt, ckpt.pt), the resumed run ends
    with a best.pt holding the best validation its log shows."""
    common = ["--dropout=0.1", "--eval_interval=2", "--max_steps=6", "--lr=3e-3",
              "--warmup_steps=1"]
    run_encoder(small300, tmp_path / "a", *common)
    val = [r for r in log_rows(tmp_path / "a") if "val_recall@10" in r]
    best_step = max(val, key=lambda r: (r["val_recall@10"], -r["step"]))["step"]
    assert best_step > 0  # the test needs an improvement after step 0
    save, saves = common_module.save_checkpoint, []

    def killed(obj, path):  # the process dies right after the first save of step best_step
        save(obj, path)
        saves.append(obj["step"])
        if obj["step"] == best_step:
            raise KeyboardInterrupt

    monkeypatch.setattr(common_module, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        run_encoder(small300, tmp_path / "b", *common)
    monkeypatch.undo()
    run_encoder(small300, tmp_path / "b", "--init_from=resume", *common)
    best = load_checkpoint(str(tmp_path / "b" / "best.pt"))
    assert best["step"] == best_step and best["best"] == max(r["val_recall@10"] for r in val)


def test_the_log_survives_kills(small300, tmp_path, monkeypatch):
    """A torn last line of log.jsonl (a kill mid-write) is dropped with a warning on resume; a kill
    while the resumed run rewrites the log leaves the old log whole (it is replaced atomically)."""
    common = ["--eval_interval=3", "--max_steps=3"]
    run_encoder(small300, tmp_path, *common)
    rows = log_rows(tmp_path)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    text = (tmp_path / "log.jsonl").read_text()
    replace = os.replace

    def killed(src, dst):
        if str(dst).endswith("log.jsonl"):
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run_encoder(small300, tmp_path, "--init_from=resume", "--max_steps=6", "--eval_interval=3")
    monkeypatch.undo()
    assert (tmp_path / "log.jsonl").read_text() == text
    run_encoder(small300, tmp_path, "--init_from=resume", "--max_steps=6", "--eval_interval=3")
    assert log_rows(tmp_path)[:len(rows)] == rows and log_rows(tmp_path)[-1]["step"] == 6


def test_a_checkpoint_is_used_only_with_its_own_data(small300, tmp_path, capsys):
    """eval.py (and train_llm.py's encoder_ckpt/llm_ckpt, and resume) refuse data the checkpoint was
    not trained on, and find the data from any working directory (the path is stored absolute)."""
    other = data.prepare(data.config(n_users=120, n_items=60, n_genres=4,
                                     raw_dir=str(tmp_path / "raw"),
                                     out_dir=str(tmp_path / "other")))
    run_encoder(small300, tmp_path / "enc", "--max_steps=1")
    ckpt = f"--ckpt={tmp_path / 'enc' / 'best.pt'}"
    with pytest.raises(UserError, match=r"best.pt was trained on .*prep \(300 users.*, "
                                        r"not on .*other \(120 users"):
        evaluation.main([ckpt, f"--data_dir={other}"])
    with pytest.raises(UserError, match=r"ckpt.pt was trained on .*prep .*, not on .*other"):
        run_encoder(other, tmp_path / "enc", "--max_steps=2", "--init_from=resume")
    with pytest.raises(UserError, match=r"best.pt was trained on .*prep .*, not on .*other"):
        train_llm.main([f"--data_dir={other}", f"--encoder_ckpt={tmp_path / 'enc' / 'best.pt'}",
                        f"--out_dir={tmp_path / 'llm'}", "--max_steps=0"])
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        # the stored path, from another directory
        assert evaluation.main([ckpt])["ar encoder"]["recall@10"] >= 0
    finally:
        os.chdir(cwd)
    with pytest.raises(UserError,
                       match=r"--data_dir=.*nowhere holds no prepared dataset.*point --data_dir="):
        evaluation.main([ckpt, f"--data_dir={tmp_path / 'nowhere'}"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(small300, tmp_path, monkeypatch):
    """A NaN loss stops the run before its update, in one line; ckpt.pt keeps the last good step."""
    forward, calls = encoder.UserEncoder.forward, []

    def exploding(self, batch):  # NaN from the 4th training step on
        calls.append(1)
        loss = forward(self, batch)
        return loss * float("nan") if len(calls) >= 4 else loss

    monkeypatch.setattr(encoder.UserEncoder, "forward", exploding)
    with pytest.raises(UserError, match="loss is nan at step 3: stopping. The last good checkpoint "
                                        "is .*ckpt.pt"):
        run_encoder(small300, tmp_path, "--max_steps=10", "--eval_interval=2")
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_config_typo_fails_naming_the_key(small300):
    with pytest.raises(UserError, match="unknown key 'n_layers'.*'n_layer'"):
        train_encoder.main([f"--data_dir={small300}", "--n_layers=2"])


def evaluate(out_dir, data_dir):
    return evaluation.main([f"--ckpt={out_dir}/best.pt", f"--data_dir={data_dir}"])


@pytest.mark.slow
def test_ar_encoder_approaches_the_oracle(synthetic, pretrained_encoder):
    """Sec 3.1's encoder on data with a known answer: >= 80% of the oracle's test Recall@10, far
    above most-popular."""
    rows = evaluate(pretrained_encoder, synthetic)
    oracle = sources.oracle_recall(data.UserData(synthetic), "test", ks=(10,))["recall@10"]
    model, popular = rows["ar encoder"]["recall@10"], rows["most popular"]["recall@10"]
    assert model >= 0.8 * oracle, (model, oracle)
    assert model > 4 * popular, (model, popular)


@pytest.mark.slow
@pytest.mark.parametrize("kind,margin", [("bert4rec", 1.5), ("dual", 1.0)])
def test_baseline_encoders_beat_most_popular(synthetic, tmp_path, kind, margin):
    """The paper's baseline encoders (Table 2) learn too: 400 steps, and validation loss falls while
    test Recall@10 passes most-popular's, Bert4Rec's by half again. The Dual Encoder gets one target
    per user per step (AR one per event, Bert4Rec one per masked event): 400 steps take it to about
    1.2x."""
    train_encoder.main([os.path.join(ROOT, "configs/synthetic_enc.py"), f"--data_dir={synthetic}",
                        f"--out_dir={tmp_path}", f"--kind={kind}", "--max_steps=400",
                        "--eval_interval=400", "--eval_examples=500"])
    val = [r["val_loss"] for r in log_rows(tmp_path) if "val_loss" in r]
    assert val[-1] < val[0] - 0.1, val
    rows = evaluate(tmp_path, synthetic)
    assert rows[f"{kind} encoder"]["recall@10"] > margin * rows["most popular"]["recall@10"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ar", "bert4rec"])
def test_two_processes_equal_one(small300, tmp_path, kind):
    """torchrun --nproc_per_node=2 computes what one process computes, dropout and Bert4Rec's masks
    on: the same global batches, the same random draws, the same losses, weights and Adam
    moments."""
    one, two = run_twice("train_encoder.py", small300, tmp_path, f"--kind={kind}", "--n_layer=1",
                         "--n_embd=32", "--feature_dims=(16, 8, 8)", "--dropout=0.1",
                         "--eval_examples=300")  # validation spans two batches: one for each rank
    assert_same_runs(one, two)
