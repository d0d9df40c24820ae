"""The pure purge tests (tests/unit/test_purge.py), run again on the real Redis ledger and
receipt chain: the in-memory ledger those tests use behaves as RetentionLedger does."""

from __future__ import annotations

import pytest
import redis

from pipeline.core.config import TransparencyConfig
from pipeline.state import keys
from pipeline.state.ledger import RetentionLedger
from pipeline.state.receipts import ReceiptLedger
from pipeline.state.tlog import TransparencyLog, audit
from pipeline.transparency.heads import signing_key
from tests.unit.fakes import RecordingSink
from tests.unit.test_purge import *  # noqa: F403  (the same tests, on this module's ledger)


class RedisLedgerUnderTest(RetentionLedger):
    """The real ledger; its receipts go to the real chain through a recorder."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self.chain = RecordingSink(ReceiptLedger(client))

    def receipts(self) -> RecordingSink:
        return self.chain

    @property
    def purge_failures(self) -> int:
        return int(self.redis.get(keys.PURGE_FAILURES) or 0)


@pytest.fixture()
def ledger(redis_server):
    """Database 2 of the session's server: the running service (db 0) never sees it."""
    client = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/2")
    ledger = RedisLedgerUnderTest(client)
    yield ledger
    # Every receipt the tests saw appended is in the real log, which is intact.
    log = TransparencyLog(client)
    assert log.size() == len(ledger.chain.appended)
    assert audit(log, signing_key(TransparencyConfig(), []).public_key()) == []
    client.flushdb()
