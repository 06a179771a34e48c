"""The run infrastructure every trainer shares (train/run.py): resume-or-refuse, the logger, the non-finite stop."""
import json

import jax.numpy as jnp
import pytest

from jaxrlhf.train.checkpoint import Checkpointer
from jaxrlhf.train.run import data_fingerprint, resume_step, stop_if_not_finite, wandb_setting

FP = {"trainer": "ppo", "--seed": 7, "--train_batch_size": 8, "--prompt_data": data_fingerprint([[1, 2], [3]], 16)}


def saved(tmp_path, meta):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(2, {"x": jnp.zeros(2)}, meta)
    return Checkpointer(tmp_path / "ckpt")


def resume(ckpt, tmp_path, fingerprint=FP, **kw):
    return resume_step(ckpt, ckpt_path=str(tmp_path / "ckpt"), fingerprint=fingerprint,
                       **{"load_checkpoint": True, **kw})


def test_fresh_run_and_matching_resume(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    assert resume(ckpt, tmp_path) is None and resume(ckpt, tmp_path, load_checkpoint=False) is None
    ckpt = saved(tmp_path, {"step": 2, "fingerprint": FP})
    assert ckpt.read_meta(2)["fingerprint"]["--seed"] == 7
    assert resume(ckpt, tmp_path) == 2


def test_used_ckpt_path_needs_load_checkpoint(tmp_path):
    ckpt = saved(tmp_path, {"step": 2, "fingerprint": FP})
    with pytest.raises(ValueError) as e:
        resume(ckpt, tmp_path, load_checkpoint=False)
    assert "already holds checkpoints (steps [2]): pass --load_checkpoint" in str(e.value)
    assert "another --ckpt_path" in str(e.value)


@pytest.mark.parametrize("change, flag", [
    ({"--seed": 8}, "--seed: checkpoint 7, this run 8"),
    ({"--train_batch_size": 16}, "--train_batch_size: checkpoint 8, this run 16"),
    ({"--prompt_data": data_fingerprint([[1, 2], [4]], 16)}, "--prompt_data: checkpoint '16 rows, sha256"),
])
def test_mismatched_resume_names_the_flag(tmp_path, change, flag, capsys):
    ckpt = saved(tmp_path, {"step": 2, "fingerprint": FP})
    with pytest.raises(ValueError) as e:
        resume(ckpt, tmp_path, {**FP, **change})
    assert flag in str(e.value) and "--allow_config_change" in str(e.value), e.value
    assert resume(ckpt, tmp_path, {**FP, **change}, allow_config_change=True) == 2
    assert "resuming despite " + flag.split(":")[0] in capsys.readouterr().err


def test_other_trainer_or_no_fingerprint_is_refused(tmp_path):
    ckpt = saved(tmp_path, {"step": 2, "fingerprint": FP})
    with pytest.raises(ValueError, match="written by the 'ppo' trainer, not 'sft'"):
        resume(ckpt, tmp_path, {**FP, "trainer": "sft"}, allow_config_change=True)
    old = saved(tmp_path / "old", {"step": 2})
    with pytest.raises(ValueError, match="records no run fingerprint"):
        resume(old, tmp_path / "old")
    assert resume(old, tmp_path / "old", allow_config_change=True) == 2


def test_data_fingerprint_sees_order_and_count():
    assert data_fingerprint([[1, 2], [3]], 2) != data_fingerprint([[3], [1, 2]], 2)
    assert data_fingerprint([[1, 2], [3]], 2) != data_fingerprint([[1, 2], [3]], 3)
    assert data_fingerprint([[1], [2, 3]], 2) != data_fingerprint([[1, 2], [3]], 2)  # row boundaries count


@pytest.mark.parametrize("flag, want", [(None, False), ("false", False), ("False", False), ("off", False),
                                        ("true", True), ("True", True), ("abc123key", "abc123key")])
def test_wandb_flag(flag, want):
    assert wandb_setting(flag) == want


def test_non_finite_stop_names_value_and_checkpoint(tmp_path):
    ckpt = saved(tmp_path, {"step": 2})
    stop_if_not_finite({"actor/loss": 1.0}, step=3, ckpt=ckpt, ckpt_path="C", hint="lower it")
    with pytest.raises(FloatingPointError, match=r"critic/loss is nan at step 3: stopping. The last good checkpoint "
                                                 r"in C \(step 2\) is untouched; lower it"):
        stop_if_not_finite({"actor/loss": 1.0, "critic/loss": float("nan")}, step=3, ckpt=ckpt, ckpt_path="C",
                           hint="lower it")


def test_metrics_log_fresh_or_continued(tmp_path):
    from jaxrlhf.train.metrics import MetricsLogger

    with MetricsLogger(tmp_path, show_progress=False) as log:
        log.log(1, {"reward": 0.5})
    with MetricsLogger(tmp_path, show_progress=False) as log:  # a resumed run appends
        log.log(2, {"reward": 0.6})
    with MetricsLogger(tmp_path, show_progress=False, fresh=True) as log:  # a new run starts its own file
        log.log(1, {"reward": 0.1})
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    prev = [json.loads(x) for x in (tmp_path / "metrics.jsonl.prev").read_text().splitlines()]
    assert [(r["step"], r["reward"]) for r in rows] == [(1, 0.1)]
    assert [r["step"] for r in prev] == [1, 2]


def test_checkpoint_directory_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file: pass a directory as --ckpt_path"):
        Checkpointer(tmp_path / "f")


def test_a_run_that_saved_and_logged_nothing_leaves_no_empty_outputs(tmp_path):
    """A run failing before its first checkpoint / metric leaves no empty --ckpt_path, logs/ or metrics.jsonl; a
    fresh run that fails keeps the last run's metrics.jsonl where it was."""
    from jaxrlhf.train.metrics import MetricsLogger

    save = tmp_path / "save"
    with pytest.raises(RuntimeError):
        with Checkpointer(save / "checkpoints"), MetricsLogger(save / "logs", show_progress=False, fresh=True):
            raise RuntimeError("the run failed before step 1")
    assert not save.exists()
    with MetricsLogger(save / "logs", show_progress=False) as log:  # a run that logged keeps its file
        log.log(1, {"loss": 1.0})
    with Checkpointer(save / "checkpoints"), MetricsLogger(save / "logs", show_progress=False, fresh=True):
        pass  # failed again before logging: the earlier log stays metrics.jsonl (no empty file, no .prev)
    assert sorted(p.name for p in save.rglob("*")) == ["logs", "metrics.jsonl"]
    (save / "keep").mkdir()  # a directory that existed before is never removed
    with Checkpointer(save / "keep"):
        pass
    assert (save / "keep").is_dir()


def test_unwritable_or_blocked_output_paths_are_named(tmp_path):
    from jaxrlhf.train.run import prepare_outputs

    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"--save_path .*/f/out: .*/f is a file, so no directory can be made"):
        prepare_outputs(str(tmp_path / "f" / "out"))
    with pytest.raises(NotADirectoryError, match=r"--ckpt_path .*/f/c: .*/f is a file"):
        Checkpointer(tmp_path / "f" / "c")
    with pytest.raises(NotADirectoryError, match="is a file: pass a directory as --save_path"):
        prepare_outputs(str(tmp_path / "f"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # nothing created, no probe left


def test_secrets_do_not_reach_wandb_config():
    from jaxrlhf.train.run import without_secrets

    got = without_secrets({"remote_rm_token": "s3cret", "use_wandb": "0123abcd", "tokenizer_chat_template": "{{x}}",
                           "remote_rm_url": "http://h/x", "unset_token": None})
    assert got == {"remote_rm_token": "<hidden>", "use_wandb": "<hidden>", "tokenizer_chat_template": "{{x}}",
                   "remote_rm_url": "http://h/x", "unset_token": None}
    assert without_secrets({"use_wandb": "true"}) == {"use_wandb": "true"}
