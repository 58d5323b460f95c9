"""The boilerplate block (distributed setup, data, schedule, checkpointing, command line) is repeated in every
method script on purpose, so a reader sees the same text everywhere. It must stay byte-identical."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["mae.py", "moco.py", "graft.py", "mimco.py", "micl.py"]
BEGIN, END = "boilerplate: identical in every method script", "end boilerplate"


def block(name):
    text = open(os.path.join(ROOT, name)).read()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{name}: boilerplate markers missing or repeated"
    return text[text.index(BEGIN):text.index(END)]


@pytest.mark.parametrize("name", [s for s in SCRIPTS[1:] if os.path.isfile(os.path.join(ROOT, s))])
def test_boilerplate_identical_to_mae(name):
    ref, other = block("mae.py").splitlines(), block(name).splitlines()
    diff = [f"line {i}: mae.py {a!r} vs {name} {b!r}" for i, (a, b) in enumerate(zip(ref, other)) if a != b]
    assert not diff and len(ref) == len(other), "\n".join(diff[:5]) or f"{name}: block length differs"
