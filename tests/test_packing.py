"""Names are checked where they are first given, by the same rules the config applies later."""

from __future__ import annotations

import pytest

from daemon import packing
from daemon.config import RESERVED_MODEL_NAMES


@pytest.mark.parametrize("name", sorted(RESERVED_MODEL_NAMES))
def test_a_reserved_model_name_is_refused_at_pack_time(name: str) -> None:
    with pytest.raises(ValueError, match=rf"invalid model name '{name}': it is reserved \(GET /v2/models/stats\)"):
        packing.check_name("model name", name)
    packing.check_name("version", name)  # a version may be called anything the pattern allows
