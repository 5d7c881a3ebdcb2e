"""The one command-line parser (sdpo.utils.command_line.ConfigParser) as every entry point uses it: --help derived
from the dataclasses, the reference's flag names as aliases, YAML --config files (values land in the dataclasses,
the command line wins), and every --config mistake as one line with exit status 2 before anything loads."""

import dataclasses
import re

import pytest

import eval_online_sdpo
import live_chat
from auxiliary import eval_checkpoints, eval_incontext_oracle, sdpo_signal_analysis
from sdpo.learner.config import OnlineSDPOConfig
from sdpo.online import config as online_config
from sdpo.online.config import OnlineRunConfig
from sdpo.personas.participants import ParticipantsArguments
from sdpo.utils.command_line import ConfigParser, UsageError


def squeezed(text: str) -> str:
    """``text`` without whitespace (argparse wraps help lines, also after hyphens)."""
    return re.sub(r"\s+", "", text)


def online_argv(prompt_files, tmp_path, *extra) -> list[str]:
    train, val = prompt_files
    return [
        "--train_jsonl",
        str(train),
        "--val_jsonl",
        str(val),
        "--run_name",
        "r",
        "--out_dir",
        str(tmp_path / "run"),
        *extra,
    ]


# ---- --help and the reference's names


def test_the_online_help_is_derived_from_every_dataclass_field():
    text = squeezed(online_config.build_parser().format_help())
    for dataclass_type in (OnlineSDPOConfig, ParticipantsArguments, OnlineRunConfig):
        for spec in dataclasses.fields(dataclass_type):
            assert f"--{spec.name}" in text, spec.name
            assert spec.metadata.get("help"), f"{dataclass_type.__name__}.{spec.name} has no help"
            assert squeezed(spec.metadata["help"]) in text, spec.name


def test_the_live_chat_help_is_derived_from_its_dataclasses():
    text = squeezed(live_chat.build_parser().format_help())
    for dataclass_type in (OnlineSDPOConfig, live_chat.ChatSettings):
        for spec in dataclasses.fields(dataclass_type):
            assert squeezed(spec.metadata["help"]) in text, spec.name


@pytest.mark.parametrize(
    ("flag", "value", "field", "expected"),
    [
        ("--model", "smollm2-135m-instruct", "model_name_or_path", "smollm2-135m-instruct"),
        ("--lr", "3e-5", "learning_rate", 3e-5),
        ("--optim", "adamw", "optimizer", "adamw"),
        ("--dtype", "float32", "torch_dtype", "float32"),
    ],
)
def test_every_reference_alias_sets_its_field(prompt_files, tmp_path, flag, value, field, expected):
    arguments = online_config.parse_arguments(online_argv(prompt_files, tmp_path, flag, value))
    assert getattr(arguments.learner, field) == expected


def test_the_reference_oracle_judge_names_are_aliases(tmp_path):
    (judges,) = ConfigParser(ParticipantsArguments).parse(
        ["--judge_tp", "2", "--judge_gpu_start", "3", "--judge_device", "cpu"]
    )
    assert (judges.user_vllm_tp, judges.user_vllm_gpu_start, judges.user_device) == (2, 3, "cpu")


def test_errors_name_the_documented_spelling_of_a_flag():
    with pytest.raises(UsageError) as raised:
        ConfigParser(OnlineSDPOConfig).parse(["--loss_mode", "nope"])
    assert str(raised.value).startswith("argument --loss_mode: invalid choice: 'nope'") and "--loss-mode" not in str(
        raised.value
    )


# ---- YAML --config


def test_online_yaml_values_land_in_the_dataclasses_and_the_command_line_wins(prompt_files, tmp_path):
    train, val = prompt_files
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: smollm2-135m-instruct\nlr: 2.0e-5\ntrain_jsonl: {train}\nval_jsonl: {val}\nrun_name: from_yaml\n"
        f"out_dir: {tmp_path / 'run'}\ntrain_n: 6\nuser_backend: rule\njudge_backend: rule\n"
        "lora_target_modules: [q_proj, v_proj]\neval_styles: [short]\nchat_template_kwargs: {enable_thinking: true}\n"
    )
    arguments = online_config.parse_arguments(["--config", str(config), "--train_n", "3", "--lr", "1e-4"])
    learner, participants, run = arguments.learner, arguments.participants, arguments.run
    assert learner.model_name_or_path == "smollm2-135m-instruct" and learner.learning_rate == 1e-4  # the flag wins
    assert learner.lora_target_modules == ["q_proj", "v_proj"] and learner.chat_template_kwargs == {
        "enable_thinking": True
    }
    assert (run.train_n, run.run_name, run.eval_styles) == (3, "from_yaml", ["short"])
    assert (participants.user_backend, participants.judge_backend) == ("rule", "rule")


def test_live_chat_yaml_values_land_in_the_dataclasses_and_the_command_line_wins(tmp_path):
    config = tmp_path / "chat.yaml"
    config.write_text(
        f"model: some-model\nport: 7000\nadapters_dir: {tmp_path / 'adapters'}\nlora_r: 8\nmax_history_messages: 4\n"
    )
    learner, settings, use_vllm, _ = live_chat.resolve(["--config", str(config), "--port", "7001"])
    assert learner.model_name_or_path == "some-model" and learner.lora_r == 8 and learner.use_lora
    assert (settings.port, settings.max_history_messages, settings.adapters_dir) == (
        7001,
        4,
        str(tmp_path / "adapters"),
    )
    assert learner.checkpoint_dir == settings.adapters_dir and use_vllm is False


ENTRY_POINTS = {
    "eval_online_sdpo": eval_online_sdpo.main,
    "live_chat": live_chat.main,
    "eval_checkpoints": eval_checkpoints.main,
    "eval_incontext_oracle": eval_incontext_oracle.main,
    "sdpo_signal_analysis": sdpo_signal_analysis.main,
}
CONFIG_MISTAKES = {
    "a folder": (lambda t: ["--config", str(t)], "--config {t}: is a folder; pass a YAML file"),
    "given last": (lambda t: ["--seed", "3", "--config"], "--config needs a YAML file: --config run.yaml"),
    "a missing file": (lambda t: ["--config", str(t / "none.yaml")], "--config {t}/none.yaml: no such file"),
    "a float for an int field": (
        lambda t: ["--config", _yaml(t, "seed: 2.5\n")],
        "--config {t}/c.yaml: seed must be a whole number, got 2.5",
    ),
    "an unknown key": (
        lambda t: ["--config", _yaml(t, "seed: 3\nno_such_setting: 1\n")],
        "--config {t}/c.yaml: unknown key(s) no_such_setting: use the option names of --help",
    ),
    "not a mapping": (lambda t: ["--config", _yaml(t, "- seed\n")], "--config {t}/c.yaml: "),
    "not YAML": (lambda t: ["--config", _yaml(t, "seed: [3\n")], "--config {t}/c.yaml: not valid YAML"),
}


def _yaml(folder, text: str) -> str:
    path = folder / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("mistake", sorted(CONFIG_MISTAKES))
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_config_mistakes_are_one_line_and_exit_2_before_anything_loads(entry, mistake, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_argv, message = CONFIG_MISTAKES[mistake]
    try:
        returned = ENTRY_POINTS[entry](make_argv(tmp_path))
    except SystemExit as exited:  # would be argparse exiting on its own: the test then fails on the status
        returned = exited.code
    err = capsys.readouterr().err
    assert returned == 2, err
    assert re.fullmatch(r"error: [^\n]+\n", err), err
    assert err.startswith("error: " + message.format(t=tmp_path)), err
