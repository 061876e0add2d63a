"""config.py: config files and --key=value overrides (typos and bad types are one-line errors),
--help, and the one-line report of a UserError at every script's entry point."""
import os
import subprocess
import sys

import pytest

from config import UserError, configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DEFAULTS = dict(lr=1e-3, max_steps=100, dataset="synthetic", compile=False, dims=(64, 16),
                init=None)


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\nlr = 3e-4\nmax_steps = 7\n_private = 1\n")
    cfg = configure(DEFAULTS,
                    [str(f), "--lr=1", "--dataset=ml20m", "--compile=True", "--dims=[8, 4]",
                     "--init=None"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # int -> float
    assert (cfg.max_steps == 7 and cfg.dataset == "ml20m"
            and cfg.compile is True and cfg.dims == (8, 4))
    assert cfg.init is None


def test_config_typo_names_the_key(tmp_path):
    with pytest.raises(UserError, match="unknown key 'lrr'.*did you mean 'lr'"):
        configure(DEFAULTS, ["--lrr=1"])
    f = tmp_path / "c.py"
    f.write_text("max_step = 3\n")
    with pytest.raises(UserError, match="unknown key 'max_step' in .*c.py"):
        configure(DEFAULTS, [str(f)])


def test_config_type_errors():
    with pytest.raises(UserError, match="'max_steps' expects int"):
        configure(DEFAULTS, ["--max_steps=1.5"])
    with pytest.raises(UserError, match="'compile' expects True/False"):
        configure(DEFAULTS, ["--compile=3"])
    with pytest.raises(UserError, match="expected --key=value"):
        configure(DEFAULTS, ["--lr", "1"])


def test_config_file_errors_are_one_line(tmp_path):
    """A config file that is not valid Python, or fails when run, is one line: file, line, what is
    wrong."""
    f = tmp_path / "c.py"
    f.write_text("lr = 3e-4\nmax_steps = (7\n")
    with pytest.raises(UserError, match=r"^config: .*c.py:2: .*(never closed|invalid syntax)"):
        configure(DEFAULTS, [str(f)])
    f.write_text("lr = 3e-4\n\nmax_steps = steps * 2\n")
    with pytest.raises(UserError,
                       match=r"^config: .*c.py:3: NameError: name 'steps' is not defined$"):
        configure(DEFAULTS, [str(f)])


def test_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        configure(DEFAULTS, ["--lr=1", "-h"], "Train something.\n")
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("Train something.")
    assert "--max_steps" in out and "100" in out and "(64, 16)" in out and "'synthetic'" in out


@pytest.mark.parametrize("script",
                         ["data", "train_encoder", "train_llm", "eval", "flops", "bench", "report"])
def test_every_script_answers_help(script, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and module.__doc__.strip().splitlines()[0] in out and "  --" in out


@pytest.mark.parametrize("args", [["train_encoder.py", "--n_layers=2"],
                                  ["eval.py", "--ckpt=missing.pt"], ["data.py", "--dataset=ml2m"],
                                  ["train_llm.py", "--fusion=film"]])
def test_a_user_error_is_one_line_at_the_command_line(args, tmp_path):
    """Library code raises UserError; the script's entry point prints its message as one line, exit
    code 1, no traceback."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, args[0]), *args[1:]], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == "", (r.stdout, r.stderr)
