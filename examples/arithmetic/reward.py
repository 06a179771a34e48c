"""A verifiable arithmetic reward for ``--remote_rm_url examples/arithmetic/reward.py``.

1.0 when the last number in the response equals the label (the true result), else 0.0. ``extra_logs`` reports the
accuracy and whether the response contains a number at all (``answered``), so the log shows format and correctness
apart.
"""
import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str):
    """The last number written in ``text`` (commas between digits ignored), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def reward_func(queries, prompts, labels):
    rewards, answered = [], []
    for query, prompt, label in zip(queries, prompts, labels):
        got = last_number(query[len(prompt):])
        answered.append(float(got is not None))
        rewards.append(float(got is not None and abs(got - float(label)) < 1e-6))
    return {"rewards": rewards, "extra_logs": {"accuracy": rewards, "answered": answered}}
