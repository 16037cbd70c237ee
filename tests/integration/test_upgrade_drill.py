"""A small `make upgrade-drill`: real redis-server, tritonserver, gateway and piaa-admin; heads retrained into
fs2 on a few photos while a load generator sends Score calls; every user personalized in fs2 afterwards,
no call failed. (The Spearman criterion belongs to the full drill: heads trained on 30 photos rank worse.)"""

from __future__ import annotations

import pytest

from piaa_bench.upgrade_drill import NEW_SPACE, DrillConfig, run_drill
from tests.fixtures.photos import SHARED_PHOTOS, load_photos

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
async def test_a_heads_upgrade_under_load_keeps_everyone_personalized() -> None:
    load_photos()  # fails loudly without the shared photos
    config = DrillConfig(SHARED_PHOTOS, users=6, photo_count=40, ratings_per_user=16, train_photos=30)
    result = await run_drill(config)
    assert result.personalized_before == result.users == 6
    assert result.personalized_after == result.users, result.line()
    assert result.failed_calls == 0 and result.calls > 0, result.line()
    assert result.space_after == NEW_SPACE
    assert result.spearman_before > 0.3 and result.spearman_after > 0.3, result.line()
