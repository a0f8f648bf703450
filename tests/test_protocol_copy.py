"""docs/PROTOCOL.md is the team's wire contract, copied into the repository so that users of a checkout
or a clone can read it (a newcomer's find: the README cited it, and it was nowhere to be found)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEAM_COPY = ROOT.parent / "shared" / "PROTOCOL.md"


@pytest.mark.skipif(not TEAM_COPY.exists(), reason="the team's shared folder is not beside this checkout")
def test_the_protocol_in_docs_is_the_teams_current_one() -> None:
    assert (ROOT / "docs" / "PROTOCOL.md").read_text() == TEAM_COPY.read_text(), (
        "the team's PROTOCOL.md changed: copy it to docs/PROTOCOL.md (cp ../shared/PROTOCOL.md docs/)"
    )
