"""An endpoint resends unacknowledged results with the flag of those that name an output stored
for their caller, so a restarted manager does not cache or share them either."""

from __future__ import annotations

from dlhub.endpoint import events as ev
from dlhub.endpoint.daemon import Endpoint
from dlhub.protocol import messages as m


def _endpoint_sending_to(sent: list) -> Endpoint:
    endpoint = Endpoint.__new__(Endpoint)  # only the result bookkeeping: no sockets, no pools
    endpoint.unacked, endpoint.unacked_uncacheable = {}, set()
    endpoint._to_manager = sent.append
    return endpoint


def test_resent_results_keep_their_uncacheable_flag_until_acknowledged():
    sent: list = []
    endpoint = _endpoint_sending_to(sent)
    stored, plain = b"\x01" * 16, b"\x02" * 16
    results = [m.result_record(tid, "succeeded", b"\x01\xc0") for tid in (stored, plain)]
    endpoint._carry_out([ev.SendResults(results, {"uncacheable": [stored.hex()]})])
    assert m.uncacheable_ids(sent[-1].info) == {stored}

    endpoint._resend_results(list(endpoint.unacked.values()))  # e.g. after a manager restart
    assert [r[m.R_ID] for r in sent[-1].results] == [stored, plain]
    assert m.uncacheable_ids(sent[-1].info) == {stored}

    endpoint._on_manager(m.Accepted([stored]))
    assert endpoint.unacked_uncacheable == set() and list(endpoint.unacked) == [plain]
    endpoint._resend_results(list(endpoint.unacked.values()))
    assert sent[-1].info == {}
