"""Replica choice: least outstanding, round robin on ties, passive ejection with backoff."""

from __future__ import annotations

from collections import Counter

from services.gateway.balancer import Balancer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_round_robin_when_idle_and_least_outstanding_when_busy() -> None:
    balancer = Balancer()
    balancer.set_addresses(["a", "b", "c"])
    picks: Counter[str] = Counter()
    for _ in range(300):
        replica = balancer.pick()
        assert replica is not None
        picks[replica.address] += 1
    assert picks == {"a": 100, "b": 100, "c": 100}
    balancer.replicas[0].outstanding = 5
    balancer.replicas[1].outstanding = 1
    assert {balancer.pick().address for _ in range(10)} == {"c"}  # type: ignore[union-attr]


def test_exclusion_for_retries() -> None:
    balancer = Balancer()
    balancer.set_addresses(["a", "b"])
    assert balancer.pick({"a"}).address == "b"  # type: ignore[union-attr]
    assert balancer.pick({"a", "b"}) is None


def test_ejection_after_consecutive_failures_with_growing_backoff() -> None:
    clock = Clock()
    balancer = Balancer(eject_after=2, eject_base_s=1.0, eject_max_s=3.0, clock=clock)
    balancer.set_addresses(["a", "b"])
    a = balancer.replicas[0]
    balancer.failed(a)
    assert not a.ejected(clock.now)
    balancer.failed(a)
    assert a.ejected(clock.now) and a.ejected_until == 101.0
    assert {balancer.pick().address for _ in range(6)} == {"b"}  # type: ignore[union-attr]
    clock.now = 101.5
    balancer.failed(a)
    balancer.failed(a)
    assert a.ejected_until == 103.5
    clock.now = 104.0
    balancer.failed(a)
    balancer.failed(a)
    assert a.ejected_until == 107.0  # capped at eject_max_s
    clock.now = 108.0
    balancer.succeeded(a)
    assert a.ejections == 0


def test_when_all_are_ejected_the_one_back_soonest_is_tried() -> None:
    clock = Clock()
    balancer = Balancer(eject_after=1, clock=clock)
    balancer.set_addresses(["a", "b"])
    balancer.failed(balancer.replicas[1])
    clock.now += 0.5
    balancer.failed(balancer.replicas[0])
    assert balancer.pick().address == "b"  # type: ignore[union-attr]


def test_pool_changes_keep_existing_replicas() -> None:
    balancer = Balancer()
    balancer.set_addresses(["a", "b"])
    a = balancer.replicas[0]
    a.outstanding = 3
    added, removed = balancer.set_addresses(["a", "c"])
    assert [r.address for r in added] == ["c"] and [r.address for r in removed] == ["b"]
    assert balancer.replicas[0] is a


def test_an_unreachable_replica_is_ejected_at_once_and_answers_reset_failures() -> None:
    clock = Clock()
    balancer = Balancer(eject_after=3, clock=clock)
    balancer.set_addresses(["a", "b", "c"])
    a, b = balancer.replicas[0], balancer.replicas[1]
    balancer.failed(a, unreachable=True)  # connection refused: the channel cannot connect
    assert a.ejected(clock.now) and not a.reachable
    balancer.failed(b)
    balancer.failed(b)
    balancer.succeeded(b)  # an answer, even an application error, shows the transport works
    balancer.failed(b)
    balancer.failed(b)
    assert not b.ejected(clock.now) and b.reachable


def test_panic_threshold_routes_to_every_replica() -> None:
    clock = Clock()
    balancer = Balancer(eject_after=1, clock=clock)
    balancer.set_addresses(["a", "b", "c", "d"])
    a, b, c, d = balancer.replicas
    balancer.failed(a)
    balancer.failed(b)
    # Half ejected is not more than half: ejected replicas are skipped.
    assert not balancer.panicking() and {r.address for r in balancer.routable()} == {"c", "d"}
    assert {balancer.pick().address for _ in range(8)} == {"c", "d"}  # type: ignore[union-attr]
    balancer.failed(c)
    # Three of four ejected: panic, every replica takes traffic, the least busy first.
    assert balancer.panicking() and balancer.routable() == [a, b, c, d]
    d.outstanding = 2
    a.outstanding = b.outstanding = 1
    assert balancer.pick().address == "c"  # type: ignore[union-attr]
    c.outstanding = 3
    assert {balancer.pick().address for _ in range(8)} == {"a", "b"}  # type: ignore[union-attr]


def test_the_only_replica_ejected_still_takes_traffic() -> None:
    clock = Clock()
    balancer = Balancer(eject_after=1, clock=clock)
    balancer.set_addresses(["a"])
    balancer.failed(balancer.replicas[0])
    assert balancer.panicking() and balancer.routable() == balancer.replicas
    assert balancer.pick().address == "a"  # type: ignore[union-attr]


def test_a_passing_health_check_brings_back_a_replica_seen_down_at_once() -> None:
    clock = Clock()
    balancer = Balancer(eject_after=3, eject_max_s=30.0, clock=clock)
    balancer.set_addresses(["a", "b", "c"])
    a = balancer.replicas[0]
    for _ in range(6):  # refused while it restarts: ejected again and again, the backoff grows
        balancer.check_failed(a, unreachable=True)
    assert a.ejected(clock.now) and not a.reachable and a.down and a.ejected_until == clock.now + 30.0
    assert balancer.check_passed(a)
    assert not a.ejected(clock.now) and a.reachable and not a.down and a in balancer.healthy()
    assert not balancer.check_passed(a)  # nothing to bring back any more


def test_failed_checks_count_like_transport_failures_and_not_serving_ejects_at_once() -> None:
    clock = Clock()
    balancer = Balancer(eject_after=3, clock=clock)
    balancer.set_addresses(["a", "b", "c"])
    a, b = balancer.replicas[0], balancer.replicas[1]
    balancer.check_failed(a)  # timed out: one transport failure
    balancer.check_failed(a)
    assert not a.ejected(clock.now) and a.down
    balancer.check_failed(a)
    assert a.ejected(clock.now) and a.reachable  # it may answer; it did not in time
    balancer.check_failed(b, not_serving=True)  # draining: no new traffic
    assert b.ejected(clock.now) and b.reachable
    assert balancer.check_passed(b) and not b.ejected(clock.now)


def test_a_passing_check_leaves_a_replica_ejected_for_stalls_alone() -> None:
    clock = Clock()
    balancer = Balancer(eject_after=2, clock=clock)
    balancer.set_addresses(["a", "b", "c"])
    a, b = balancer.replicas[0], balancer.replicas[1]
    balancer.failed(a, stalled=True)
    assert not balancer.check_passed(a) and a.consecutive_failures == 1  # checks never hide stalls
    balancer.failed(a, stalled=True)
    assert a.ejected(clock.now) and not a.down
    assert not balancer.check_passed(a) and a.ejected(clock.now)  # its data path is the problem
    balancer.failed(b)  # reset by the peer: seen down
    assert balancer.check_passed(b) and b.consecutive_failures == 0


def test_health_check_ejections_obey_the_panic_threshold() -> None:
    clock = Clock()
    balancer = Balancer(eject_after=3, panic_threshold=0.5, clock=clock)
    balancer.set_addresses(["a", "b"])
    a, b = balancer.replicas
    balancer.check_failed(a, unreachable=True)
    assert not balancer.panicking() and balancer.routable() == [b]
    balancer.check_failed(b, not_serving=True)
    # Both ejected by their checks: panic, both take traffic rather than none.
    assert balancer.panicking() and balancer.routable() == [a, b]
    assert balancer.pick() is not None
    balancer.check_passed(a)
    assert not balancer.panicking() and balancer.routable() == [a]
