"""The chaos run's bounded form (bench/chaos.py --quick): 50 clients through a proxy that
refuses, delays, stalls and cuts connections, the server SIGKILLed and restarted twice;
nothing acknowledged is lost or doubled, every view equals the store."""

from __future__ import annotations

import pytest

from bench import chaos

pytestmark = pytest.mark.slow


def test_chaos_quick():
    cfg = chaos.quick(seed=1)
    result = chaos.run(cfg)
    print(chaos.report(result))
    f = result["figures"]
    assert not result["failures"], chaos.report(result)
    # The run did what it says: the mischief happened, and everything was checked.
    assert f["kills"] == 2 and f["proxy"]["cut"] > 50 and f["proxy"]["refused"] > 0 and f["proxy"]["stalled"] > 0
    assert f["resumes"] > 50 and f["editor_sessions"] > cfg.editors and f["viewer_sessions"] > cfg.viewers
    assert (f["messages"], f["acked"], f["stored"], f["lost"], f["doubled"], f["view_mismatches"]) == (
        2000, 2000, 2000, 0, 0, 0)
    assert f["deleted"] > 0 and f["diverged"] == 0 and f["edits"] >= 290 and f["points_missed"] == 0
    assert f["seconds"] < 50
