"""jaxrlhf.cli: flags generated from a config dataclass, YAML, precedence, errors."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

import pytest
import yaml

from jaxrlhf.cli import arg, config_to_dict, parse_config


@dataclass
class Cfg:
    """A config exercising every supported type."""

    pretrain: str = arg(None, "model path")
    actor_learning_rate: float = arg(1e-6, "peak learning rate")
    max_epochs: int = arg(1, "epochs per batch")
    save_steps: int = arg(-1, "save every N steps; -1 never")
    flash_attn: bool = arg(False, "flash attention")
    packing_samples: bool = arg(True, "pack samples")
    advantage_estimator: Literal["gae", "reinforce", "group_norm"] = arg("gae", "advantage estimator")
    n_samples_per_prompt: Literal[1, 4, 8] = arg(1, "samples per prompt")
    prompt_data: list[str] = arg([], "prompt datasets")
    prompt_data_probs: list[float] = arg([1.0], "sampling probabilities")
    seeds: tuple[int, ...] = arg((1, 2), "seeds")
    max_samples: Optional[int] = arg(None, "cap on samples")
    kl_target: Optional[float] = arg(0.1, "adaptive KL target")

    def __post_init__(self) -> None:
        if self.prompt_data and len(self.prompt_data_probs) not in (1, len(self.prompt_data)):
            raise ValueError(
                f"--prompt_data_probs has {len(self.prompt_data_probs)} entries for {len(self.prompt_data)} datasets"
            )


@dataclass
class Required:
    """Needs a path."""

    pretrain: str = arg(help="model path (required)")
    lr: float = arg(1.0, "lr")


def write_yaml(tmp_path, data) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def error_of(capsys, fn) -> str:
    """Run fn expecting an argparse-style exit 2; return stderr."""
    with pytest.raises(SystemExit) as exc:
        fn()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_defaults() -> None:
    cfg = parse_config(Cfg, [])
    assert cfg == Cfg()
    assert cfg.prompt_data == [] and cfg.seeds == (1, 2) and cfg.pretrain is None


def test_every_type_from_cli() -> None:
    cfg = parse_config(
        Cfg,
        [
            "--pretrain", "/models/llama",
            "--actor_learning_rate", "5e-7",
            "--max_epochs", "3",
            "--save_steps", "-1",
            "--flash_attn",
            "--no_packing_samples",
            "--advantage_estimator", "group_norm",
            "--n_samples_per_prompt", "8",
            "--prompt_data", "a,b", "c",
            "--prompt_data_probs", "0.2,0.3,0.5",
            "--seeds", "7", "8", "9",
            "--max_samples", "1000",
            "--kl_target", "none",
        ],
    )
    assert cfg.pretrain == "/models/llama"
    assert cfg.actor_learning_rate == 5e-7 and isinstance(cfg.actor_learning_rate, float)
    assert cfg.max_epochs == 3 and cfg.save_steps == -1
    assert cfg.flash_attn is True and cfg.packing_samples is False
    assert cfg.advantage_estimator == "group_norm"
    assert cfg.n_samples_per_prompt == 8 and isinstance(cfg.n_samples_per_prompt, int)
    assert cfg.prompt_data == ["a", "b", "c"]
    assert cfg.prompt_data_probs == [0.2, 0.3, 0.5]
    assert cfg.seeds == (7, 8, 9)
    assert cfg.max_samples == 1000 and cfg.kl_target is None


@pytest.mark.parametrize(
    "argv, flash, packing",
    [
        (["--flash_attn"], True, True),
        (["--flash_attn", "true"], True, True),
        (["--flash_attn=false"], False, True),
        (["--flash_attn", "no", "--packing_samples", "false"], False, False),
        (["--no_packing_samples"], False, False),
        (["--packing_samples"], False, True),
        (["--packing_samples", "0"], False, False),
    ],
)
def test_bools_both_ways(argv, flash, packing) -> None:
    cfg = parse_config(Cfg, argv)
    assert (cfg.flash_attn, cfg.packing_samples) == (flash, packing)


def test_no_switch_only_for_true_defaults(capsys) -> None:
    err = error_of(capsys, lambda: parse_config(Cfg, ["--no_flash_attn"]))
    assert "--no_flash_attn" in err and "did you mean --flash_attn" in err


def test_precedence_defaults_yaml_cli(tmp_path) -> None:
    path = write_yaml(
        tmp_path,
        {"actor_learning_rate": 2e-6, "max_epochs": 2, "flash_attn": True, "prompt_data": ["x", "y"],
         "prompt_data_probs": "0.5,0.5", "packing_samples": False, "max_samples": None},
    )
    cfg = parse_config(Cfg, ["--config", path, "--max_epochs", "5", "--packing_samples"])
    assert cfg.max_epochs == 5  # CLI beats YAML
    assert cfg.packing_samples is True  # CLI beats YAML (bool)
    assert cfg.actor_learning_rate == 2e-6  # YAML beats default
    assert cfg.flash_attn is True and cfg.prompt_data == ["x", "y"] and cfg.prompt_data_probs == [0.5, 0.5]
    assert cfg.advantage_estimator == "gae"  # default untouched
    # flag order does not matter: --config after the flags still loses to them
    cfg2 = parse_config(Cfg, ["--max_epochs", "5", "--config", path])
    assert cfg2.max_epochs == 5


def test_yaml_strings_are_parsed_like_cli(tmp_path) -> None:
    # PyYAML reads `1e-6` (no dot) as a string; floats must still come out as floats.
    p = tmp_path / "c.yaml"
    p.write_text("actor_learning_rate: 1e-6\nseeds: [3, 4]\nn_samples_per_prompt: 4\n")
    cfg = parse_config(Cfg, ["--config", str(p)])
    assert cfg.actor_learning_rate == 1e-6 and isinstance(cfg.actor_learning_rate, float)
    assert cfg.seeds == (3, 4) and cfg.n_samples_per_prompt == 4


def test_unknown_yaml_key_suggests(tmp_path, capsys) -> None:
    path = write_yaml(tmp_path, {"actor_learning_rat": 1e-5})
    err = error_of(capsys, lambda: parse_config(Cfg, ["--config", path]))
    assert "unknown key 'actor_learning_rat'" in err and "did you mean 'actor_learning_rate'" in err


def test_unknown_cli_key_suggests(capsys) -> None:
    err = error_of(capsys, lambda: parse_config(Cfg, ["--max_epoch", "3"]))
    assert "unrecognized argument --max_epoch" in err and "did you mean --max_epochs" in err
    # no prefix abbreviations: `--max_ep` must not silently mean --max_epochs
    err = error_of(capsys, lambda: parse_config(Cfg, ["--max_ep", "3"]))
    assert "unrecognized argument --max_ep" in err


def test_literal_choices_error(capsys) -> None:
    err = error_of(capsys, lambda: parse_config(Cfg, ["--advantage_estimator", "ppo"]))
    assert "--advantage_estimator" in err and "invalid choice: 'ppo'" in err and "'group_norm'" in err
    err = error_of(capsys, lambda: parse_config(Cfg, ["--n_samples_per_prompt", "3"]))
    assert "invalid choice" in err


def test_literal_choices_error_in_yaml(tmp_path, capsys) -> None:
    path = write_yaml(tmp_path, {"advantage_estimator": "ppo"})
    err = error_of(capsys, lambda: parse_config(Cfg, ["--config", path]))
    assert "'advantage_estimator'" in err and "invalid choice" in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--max_epochs", "1.5"], "argument --max_epochs: invalid int value: '1.5'"),
        (["--actor_learning_rate", "fast"], "argument --actor_learning_rate: invalid float value: 'fast'"),
        (["--flash_attn", "maybe"], "argument --flash_attn: invalid bool value: 'maybe'"),
        (["--prompt_data_probs", "0.5,x"], "argument --prompt_data_probs: invalid float value: 'x'"),
        (["--max_epochs"], "--max_epochs"),
        (["stray"], "unexpected value"),
    ],
)
def test_wrong_value_types(capsys, argv, needle) -> None:
    err = error_of(capsys, lambda: parse_config(Cfg, argv))
    assert needle in err


def test_wrong_yaml_value_types(tmp_path, capsys) -> None:
    for data, needle in [
        ({"max_epochs": 1.5}, "key 'max_epochs': invalid int value"),
        ({"flash_attn": 3}, "key 'flash_attn': invalid bool value"),
        ({"prompt_data_probs": {"a": 1}}, "key 'prompt_data_probs': expected a list"),
        ({"max_epochs": None}, "key 'max_epochs': null is not allowed"),
    ]:
        path = write_yaml(tmp_path, data)
        err = error_of(capsys, lambda: parse_config(Cfg, ["--config", path]))
        assert needle in err, err
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    assert "expected a mapping" in error_of(capsys, lambda: parse_config(Cfg, ["--config", str(p)]))
    assert "no such file" in error_of(capsys, lambda: parse_config(Cfg, ["--config", str(tmp_path / "nope.yaml")]))


def test_post_init_error_exits_cleanly(capsys) -> None:
    argv = ["--prompt_data", "a,b,c", "--prompt_data_probs", "0.5,0.5"]
    err = error_of(capsys, lambda: parse_config(Cfg, argv, prog="ppo"))
    assert err.strip().splitlines()[-1] == (
        "ppo: error: invalid configuration: --prompt_data_probs has 2 entries for 3 datasets"
    )


def test_required_field(tmp_path, capsys) -> None:
    err = error_of(capsys, lambda: parse_config(Required, [], prog="sft"))
    assert "sft: error: the following arguments are required: --pretrain" in err
    assert parse_config(Required, ["--pretrain", "p"]).pretrain == "p"
    assert parse_config(Required, ["--config", write_yaml(tmp_path, {"pretrain": "q"})]).pretrain == "q"


def test_help_lists_fields_and_defaults(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(Cfg, ["--help"], prog="ppo")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "A config exercising every supported type." in out
    assert "--actor_learning_rate" in out and "peak learning rate (default: 1e-06)" in out
    assert "{gae,reinforce,group_norm}" in out and "--no_packing_samples" in out and "--config" in out


def test_field_without_help_is_rejected() -> None:
    @dataclass
    class Bad:
        x: int = 1

    with pytest.raises(TypeError, match="Bad.x has no help text"):
        parse_config(Bad, [])


def test_unsupported_type_is_rejected() -> None:
    @dataclass
    class Bad:
        x: dict = dataclasses.field(default_factory=dict, metadata={"help": "a dict"})

    with pytest.raises(TypeError, match="Bad.x: type .* is not supported"):
        parse_config(Bad, [])


def test_list_default_is_not_shared() -> None:
    a, b = Cfg(), Cfg()
    a.prompt_data.append("x")
    assert b.prompt_data == []


def test_config_to_dict_round_trips_through_yaml(tmp_path) -> None:
    cfg = parse_config(Cfg, ["--prompt_data", "a,b", "--prompt_data_probs", "0.4,0.6", "--seeds", "5", "--flash_attn"])
    d = config_to_dict(cfg)
    assert d["seeds"] == [5] and d["prompt_data"] == ["a", "b"] and d["flash_attn"] is True
    path = write_yaml(tmp_path, d)
    assert parse_config(Cfg, ["--config", path]) == cfg
    with pytest.raises(TypeError):
        config_to_dict(Cfg)


def test_empty_and_repeated_lists() -> None:
    assert parse_config(Cfg, ["--prompt_data", ""]).prompt_data == []
    assert parse_config(Cfg, ["--prompt_data", "a", "--prompt_data", "b"]).prompt_data == ["a", "b"]


@pytest.mark.parametrize("chunk_bytes", [1, 3, 4, 7, 1 << 24])
def test_check_utf8_names_the_line_whatever_the_chunking(tmp_path, chunk_bytes):
    from jaxrlhf.cli import check_utf8

    good = tmp_path / "good.txt"
    good.write_bytes("caf\u00e9\n\u20ac\u20ac\n\U0001f600\n".encode())  # 2-, 3- and 4-byte characters
    check_utf8(good, "x", chunk_bytes=chunk_bytes)
    bad = tmp_path / "bad.txt"
    bad.write_bytes("caf\u00e9\n\u20ac\n".encode() + b"ok \xff\n")
    with pytest.raises(ValueError, match=r"^data: line 3 is not UTF-8 text \(byte 0xff at offset 13\)"):
        check_utf8(bad, "data", chunk_bytes=chunk_bytes)
    cut = tmp_path / "cut.txt"
    cut.write_bytes("a\nb\n".encode() + "\u20ac".encode()[:2])  # a character cut off at the end of the file
    with pytest.raises(ValueError, match=r"line 3 is not UTF-8 text \(byte 0xe2 at offset 4\)"):
        check_utf8(cut, "data", chunk_bytes=chunk_bytes)
