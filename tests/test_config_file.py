"""`python -m fastazr.train --config FILE`: the option tree as TOML. A saved config rebuilds an equal
TrainConfig; precedence is preset < file < command line; `--resume DIR` reads DIR/config.toml; and
every bad key or value is refused with the file, the key path and what it takes."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from fastazr.options import CONFIG_NAME, TrainConfig, build_parser, load_config_file, parse_args, save_config


def write(tmp_path, text: str, name: str = "run.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        parse_args(argv, cuda_available=False)
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, cuda", [
    (["--preset", "cpu"], False),
    (["--preset", "gpu"], True),
    ([], True),  # auto: resolved to gpu, and written as such
    # None-valued Optional fields, set Optional fields, tuples (an empty one too) and odd strings
    (["--preset", "cpu", "--update.max-grad-norm", "none", "--azr.fixed-response-tokens", "64",
      "--engine.kv-cache-bytes", "1048576", "--engine.max-model-len", "none", "--update.betas", "0.8,0.95",
      "--sandbox.preload", "", "--model", 'dir with "quotes" \\ and ünicode',
      "--azr.temperature", "0.7", "--azr.rewards.learnability-extreme", "-0.5", "--update.lr", "3.3e-7"], False),
])
def test_saved_config_rebuilds_an_equal_config(tmp_path, argv, cuda):
    config = parse_args(argv, cuda_available=cuda)
    if argv:  # a resumed run's file describes the run; it does not resume it again
        config.resume = "runs/old"
    path = tmp_path / "out" / CONFIG_NAME
    save_config(config, path)
    # whatever machine reads it: the preset is written resolved, every option with it
    for reader_cuda in (False, True):
        assert parse_args(["--config", str(path)], cuda_available=reader_cuda) == dataclasses.replace(config, resume=None)
    text = path.read_text()
    assert text.startswith("# ") and "--config" in text.splitlines()[1]
    assert tomllib.loads(text)["preset"] in ("cpu", "gpu")


def test_function_fields_are_not_written_and_the_header_says_so(tmp_path):
    config = parse_args(["--preset", "cpu"], cuda_available=False)
    config.update.lr_schedule = lambda step: 1.0
    path = tmp_path / CONFIG_NAME
    save_config(config, path)
    assert "lr_schedule" not in tomllib.loads(path.read_text())["update"]
    assert "# update.lr_schedule was set from Python and is not written" in path.read_text()
    rebuilt = parse_args(["--config", str(path)], cuda_available=False)
    assert rebuilt.update.lr_schedule is None
    config.update.lr_schedule = None
    assert rebuilt == config


def test_file_overrides_the_preset_and_the_command_line_overrides_the_file(tmp_path):
    path = write(tmp_path, 'steps = 9\nmodel = "m.gguf"\n[azr]\nbatch_size = 5\n[update]\nlr = 2e-6\n')
    config = parse_args(["--config", path, "--azr.batch-size", "7"], cuda_available=False)
    assert config.preset == "cpu" and config.azr.references == 2  # the preset's, untouched by the file
    assert config.steps == 9 and config.model == "m.gguf" and config.update.lr == 2e-6  # the file's
    assert config.azr.batch_size == 7  # the command line's
    assert parse_args(["--config", path, "--batch-size", "4"], cuda_available=False).azr.batch_size == 4  # an alias too


def test_file_may_set_the_preset_and_the_command_line_may_change_it(tmp_path):
    path = write(tmp_path, 'preset = "gpu"\n')
    assert parse_args(["--config", path], cuda_available=False).azr.batch_size == 64
    assert parse_args(["--config", path, "--preset", "cpu"], cuda_available=False).azr.batch_size == 2


def test_keys_with_dashes_dotted_keys_and_load_config_file(tmp_path):
    path = write(tmp_path, 'azr.rewards.solver-wrong = -0.25\n[engine]\nmax-num-seqs = 64\nprefix_sharing = false\n')
    assert load_config_file(path) == {"azr.rewards.solver_wrong": -0.25, "engine.max_num_seqs": 64,
                                      "engine.prefix_sharing": False}
    config = parse_args(["--config", path], cuda_available=False)
    assert config.azr.rewards.solver_wrong == -0.25 and config.engine.max_num_seqs == 64
    assert config.engine.prefix_sharing is False


def test_a_float_option_takes_an_integer_as_a_float(tmp_path):
    config = parse_args(["--config", write(tmp_path, "[sandbox]\ntimeout_s = 3\n")], cuda_available=False)
    assert config.sandbox.timeout_s == 3.0 and type(config.sandbox.timeout_s) is float


def test_none_for_optional_options(tmp_path, capsys):
    path = write(tmp_path, '[update]\nmax_grad_norm = "none"\n[engine]\nmax_model_len = "None"\n'
                           '[azr]\nfixed_response_tokens = 32\n')
    config = parse_args(["--config", path], cuda_available=False)
    assert config.update.max_grad_norm is None and config.engine.max_model_len is None
    assert config.azr.fixed_response_tokens == 32
    # "none" is None only where None is a value: elsewhere it is a string, or refused
    assert parse_args(["--config", write(tmp_path, 'model = "none"\n')], cuda_available=False).model == "none"
    err = error(["--config", write(tmp_path, 'steps = "none"\n')], capsys)
    assert "steps takes an integer, got string 'none'" in err


@pytest.mark.parametrize("text, message", [
    ('[azr]\nbatch_size = "8"\n', "azr.batch_size takes an integer, got string '8'"),
    ("[azr]\nbatch_size = true\n", "azr.batch_size takes an integer, got boolean true"),
    ("[azr]\nbatch_size = 8.0\n", "azr.batch_size takes an integer, got float 8.0"),
    ("[azr]\nbatch_size = [8]\n", "azr.batch_size takes an integer, got array [8]"),
    ("[azr]\nbatch_size = {n = 8}\n", "azr.batch_size is an option, not a table: it takes an integer"),
    ("[azr.batch_size]\nn = 8\n", "azr.batch_size is an option, not a table"),
    ("azr = 8\n", "azr is a table of options ([azr]), got integer 8"),
    ("[azr]\nrewards = 1.0\n", "azr.rewards is a table of options ([azr.rewards]), got float 1.0"),
    ("[update]\nlr = true\n", "update.lr takes a number, got boolean true"),
    ('[update]\nlr = "1e-6"\n', "update.lr takes a number, got string '1e-6'"),
    ("[update]\nbetas = [0.9]\n", "update.betas takes an array of 2 numbers, got array [0.9]"),
    ('[update]\nbetas = [0.9, "x"]\n', "update.betas[1] takes a number, got string 'x'"),
    ("[sandbox]\npreload = \"math\"\n", "sandbox.preload takes an array of strings, got string 'math'"),
    ("[sandbox]\npreload = [1]\n", "sandbox.preload[0] takes a string, got integer 1"),
    ('[run]\ntensorboard = "false"\n', "run.tensorboard takes true or false, got string 'false'"),
    ("model = 3\n", "model takes a string, got integer 3"),
    ("[engine]\nmax_model_len = 1.5\n", 'engine.max_model_len takes an integer or "none", got float 1.5'),
    ("seed = 2024-01-01\n", "seed takes an integer, got date"),
    ("[azr]\nbatch_size = 2\nbatch-size = 3\n", "azr.batch_size is given twice, as 'batch_size' and 'batch-size'"),
    ("[update]\nlr_schedule = 1\n", "update.lr_schedule holds a Python function: it is set from Python"),
])
def test_wrong_types_name_the_file_the_key_and_what_it_takes(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    err = error(["--config", path], capsys)
    assert f"{path}: " in err and message in err


def test_unknown_keys_name_the_key_and_the_valid_choices(tmp_path, capsys):
    path = write(tmp_path, "[azr]\nbatch_sise = 3\n")
    err = error(["--config", path], capsys)
    assert f"{path}: unknown option 'batch_sise' in [azr] (did you mean 'batch_size'?)" in err
    assert "valid keys: batch_size, references," in err and "[azr.rewards]" in err

    err = error(["--config", write(tmp_path, "stepz = 3\n")], capsys)
    assert "unknown option 'stepz' at the top level (did you mean 'steps'?)" in err
    assert "valid keys: preset, model, steps, out, resume, seed, device, [azr], [engine], [update]" in err

    # an option written in the wrong table: the message says which one it belongs to
    err = error(["--config", write(tmp_path, "lr = 1e-6\n")], capsys)
    assert "unknown option 'lr' at the top level; it is an option of [update]" in err
    err = error(["--config", write(tmp_path, "[wandb]\nproject = 'x'\n")], capsys)
    assert "unknown option 'wandb' at the top level" in err
    err = error(["--config", write(tmp_path, "[azr.rewards]\nsolver_right = 1\n")], capsys)
    assert "unknown option 'solver_right' in [azr.rewards] (did you mean 'solver_wrong' or 'solver_correct'?)" in err


def test_range_errors_of_file_values_name_the_file(tmp_path, capsys):
    path = write(tmp_path, "[azr]\nbatch_size = 0\n")
    err = error(["--config", path], capsys)
    assert "AZRConfig.batch_size must be an integer >= 1" in err and path in err


def test_one_temperature_in_a_file_sets_both_and_the_command_line_replaces_both(tmp_path, capsys):
    path = write(tmp_path, "[azr]\ntemperature = 0.7\n")
    config = parse_args(["--config", path], cuda_available=False)
    assert config.azr.temperature == 0.7 == config.update.temperature
    # a saved config has both; one given on the command line replaces both, not just its own
    saved = tmp_path / CONFIG_NAME
    save_config(config, saved)
    for option in ("--azr.temperature", "--update.temperature"):
        config = parse_args(["--config", str(saved), option, "0.9"], cuda_available=False)
        assert config.azr.temperature == 0.9 == config.update.temperature
    err = error(["--config", write(tmp_path, "[azr]\ntemperature = 0.7\n[update]\ntemperature = 0.8\n")], capsys)
    assert "must equal --azr.temperature" in err


def test_resume_reads_the_run_directorys_config(tmp_path):
    run_dir = tmp_path / "run"
    # written by a run started elsewhere (its own `out` is another path): resuming continues in run_dir
    started = parse_args(["--preset", "cpu", "--azr.batch-size", "3", "--steps", "5", "--out", "elsewhere/run"],
                         cuda_available=False)
    save_config(started, run_dir / CONFIG_NAME)
    config = parse_args(["--resume", str(run_dir), "--steps", "8"], cuda_available=True)
    assert config.azr.batch_size == 3 and config.preset == "cpu"  # the run's options, not this machine's preset
    assert config.steps == 8  # the command line's
    assert config.resume == str(run_dir) and config.out == str(run_dir)
    assert parse_args(["--resume", str(run_dir), "--out", "fork"], cuda_available=False).out == "fork"


def test_resume_with_a_config_file_reads_that_file_instead(tmp_path):
    path = write(tmp_path, "[azr]\nbatch_size = 4\n")
    config = parse_args(["--resume", str(tmp_path / "no-config-here"), "--config", path], cuda_available=False)
    assert config.azr.batch_size == 4 and config.out == str(tmp_path / "no-config-here")


def test_missing_files_and_bad_toml_name_the_file(tmp_path, capsys):
    err = error(["--resume", str(tmp_path / "nowhere")], capsys)
    assert f"--resume {tmp_path / 'nowhere'}: {tmp_path / 'nowhere' / CONFIG_NAME} not found" in err
    assert "--config FILE" in err
    err = error(["--config", str(tmp_path / "missing.toml")], capsys)
    assert f"{tmp_path / 'missing.toml'}: no such config file" in err
    err = error(["--config", str(tmp_path)], capsys)
    assert "is a directory, not a config file" in err
    path = write(tmp_path, "[azr\nbatch_size = 3\n")
    err = error(["--config", path], capsys)
    assert f"{path}: not valid TOML: " in err and "line 1" in err
    path = tmp_path / "latin1.toml"
    path.write_bytes('model = "caf\xe9"\n'.encode("latin-1"))
    assert f"{path}: not valid TOML" in error(["--config", str(path)], capsys)


def test_help_tells_of_config_files():
    text = " ".join(build_parser().format_help().split())
    assert "--config FILE" in text and "[azr.rewards]" in text and f"OUT/{CONFIG_NAME}" in text
    assert "--resume DIR: DIR/config.toml" in text


def test_the_default_config_is_valid_toml_for_every_field(tmp_path):
    """Every option of the tree, not just those the tests set, survives the file."""
    config = TrainConfig()
    save_config(config, tmp_path / CONFIG_NAME)
    assert load_config_file(tmp_path / CONFIG_NAME)["sandbox.workers"] == config.sandbox.workers


def test_resume_in_a_file_is_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('resume = "runs/azr"\n')
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)], False)
