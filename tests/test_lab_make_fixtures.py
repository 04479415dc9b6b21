"""lab.make_fixtures stops a mistake that never returns (a loop made endless) after its time limit, leaves its
output out of that case, says so, and carries on with the other mistakes."""

import time

import lab.make_fixtures as make_fixtures
from lab.manifest import load_labs
from lab.mutations import m

FFN = "llama_min/feedforward.py::FeedForward.forward"


def test_an_endless_mistake_is_stopped_and_left_out(monkeypatch, capsys):
    endless = m("endless_gate", 2, FFN, "never returns",
                ("F.silu(self.w1(x))", "F.silu(self.w1(x)) * any(False for _ in iter(lambda: 0, 1))"))
    relu = m("swiglu_relu", 2, FFN, "ReLU instead of SiLU", ("F.silu", "F.relu"))
    monkeypatch.setattr(make_fixtures, "CATALOGUE", [endless, relu])
    start = time.monotonic()
    writer = make_fixtures.lab_fixtures(load_labs()[2], seconds=0.5)
    assert time.monotonic() - start < 30
    causes = {name for case in writer.cases.values() for name in case.get("causes", {})}
    assert causes == {"swiglu_relu"}, causes  # the next mistake still ran
    assert not [key for key in writer.tensors if "endless_gate" in key]
    assert "mistake endless_gate ran over 0.5 s; stopped" in capsys.readouterr().err
