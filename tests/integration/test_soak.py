"""The 2-minute version of `make soak` (tests/soak/run.py) on the real model: every answer as expected,
no worker restart, the server healthy after. The memory goal (RSS growth under 5% after warm-up) is the
30-minute run's, reported by `make soak`; two minutes are mostly warm-up, so it is printed, not asserted."""

from __future__ import annotations

import pytest
from appliance_it import server_command

from tests.soak.run import report, soak

pytestmark = pytest.mark.integration


def test_two_minute_soak_on_the_real_model(real_model):
    r = soak(2, 4, seed=1, appliance_command=server_command())
    print(report(r))
    assert r["requests"] > 50, report(r)
    assert r["errors"] == 0, report(r)
    assert r["worker_restarts"] == 0 and r["healthy_after"], report(r)
    assert set(r["by_action"]) >= {"completion", "completion_stream", "chat", "chat_stream", "cancel_stream",
                                   "bad_input", "attestation"}, r["by_action"]
