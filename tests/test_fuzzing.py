"""The fuzz harness itself: each outcome class is told apart, and a dead child does not lose later cases."""

from __future__ import annotations

from fuzzing import findings, run_cases

SETUP = """
def case(kind):
    if kind == "huge":
        bytearray(2**40)
    if kind == "refused":
        raise QuantError("file x.gguf: damaged")
    if kind == "crash":
        os.kill(os.getpid(), 9)
    if kind == "slow":
        signal.pause()
    if kind == "wrong":
        assert 1 == 2, "forward differs"
"""


def test_outcome_classes_and_recovery_after_a_crash():
    kinds = ["ok", "huge", "refused", "crash", "slow", "wrong", "ok"]
    outcomes = run_cases(SETUP, [{"kind": k} for k in kinds], case_timeout=2)
    assert [o.outcome for o in outcomes] == ["ok", "other", "refused", "crash", "timeout", "other", "ok"]
    assert outcomes[1].type == "MemoryError"  # the address-space limit, not the machine's memory
    assert outcomes[2].message == "file x.gguf: damaged"
    assert outcomes[5].type == "AssertionError" and "forward differs" in outcomes[5].message
    assert [o.params["kind"] for o in findings(outcomes)] == ["huge", "crash", "slow", "wrong"]
