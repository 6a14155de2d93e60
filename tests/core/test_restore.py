"""Directives and leased channels rebuilt from their journal
(``DirectiveRestored``, ``ChannelRestored``), without the network.

The core journals every call that changes a directive; a new core that is
given those records goes on where the old one stood: it emits no item
again, misses none, and runs again only the tasks that had no journaled
outcome. The randomized part plays the simulation's chaos (workers that
crash, return, time out, report late and twice) and kills the whole core at
random moments, once or several times, then checks exactly-once delivery
and the values across every restart.
"""

from __future__ import annotations

import pytest

from orchestrator_service._events import ChannelRestored, DirectiveRestored, TenantsChanged
from orchestrator_service._journal_records import (
    decode_plan,
    decode_records,
    encode_plan,
    encode_records,
)
from orchestrator_service._model import (
    DirectiveState,
    FoldStage,
    MapStage,
    PlanSpec,
    RouterConfig,
    TaskRecord,
)
from orchestrator_service._restore import replay, replay_channel
from squire_kernel.serde import decode, encode

from .sim import Driver, Sim, hello
from .test_simulation import SHARES, Chaos, expected

CONFIG = RouterConfig(
    journal=True, directive_window=40, max_fold_operands=3, adoption_grace=0.0
)


def restart(old: Driver, config: RouterConfig = CONFIG) -> Driver:
    """A new core on the old one's journal (an instant store: all committed),
    with the old callers' views carried over."""
    new = type(old).__new__(type(old))
    new.__dict__.update(old.__dict__)
    Driver.__init__(new, config, old.clock)
    new.router.begin_epoch(old.router.epoch + 1)  # as the store gives a new one
    new._ids = old._ids  # ids stay unique across restarts
    new.directives = {}
    for directive_id, (plan, created, records) in old.journal.items():
        view = old.directives[directive_id]
        if view.end is not None:
            continue
        # The journal survives an encoding round trip, as a real store has it.
        records = decode_records(encode_records(records))
        plan = decode_plan(encode_plan(plan))
        new.journal[directive_id] = (plan, created, list(records))
        new.directives[directive_id] = view
        new.handle(DirectiveRestored(directive_id, plan, records, created))
    new.channels = {}
    for channel_id, (created, records) in old.channel_journal.items():
        records = decode_records(encode_records(records))
        new.channel_journal[channel_id] = (created, list(records))
        view = new.channels[channel_id] = old.channels[channel_id]
        # The subscriber resumes with what it took; the rest of what was
        # delivered is read back from the journal and sent at once (as
        # Subscribe does): the new core does not count them as unread.
        _, results = replay_channel(channel_id, records, keep_results=True)
        assert [r.task.task_id for r in results[: len(view.taken)]] == [
            r.task.task_id for r in view.taken
        ], "the journal's result order is not the order the subscriber saw"
        view.taken.extend(results[len(view.taken):])
        view.results = []
        view.ended = False
        new.handle(ChannelRestored(channel_id, records, created))
    return new


def test_a_map_goes_on_where_it_stood_and_runs_only_what_had_no_outcome() -> None:
    sim = Sim(CONFIG)
    worker = sim.connect(hello("w1", capacity=4, prefetch=0))
    d = sim.start(PlanSpec((MapStage("fib_at"),)))
    sim.inputs(d, [encode(x) for x in range(20)])
    sim.end_input(d)
    sim.step(limit=3)  # 3 of the 4 leased tasks finish; 1 is at the worker
    assert len(d.items) == 3
    ran_before = len(sim.log)

    new = restart(sim)
    new.log = []
    new.held = {}
    new.connect(hello("w2", capacity=4, prefetch=0))
    new.run()
    view = new.directives[d.id]
    assert view.state is DirectiveState.DONE
    assert sorted(view.items.indexes) == list(range(20))
    assert len(new.log) == 17  # the 3 journaled outcomes did not run again
    assert ran_before == 4 and worker.id not in new.router.workers


def test_a_fold_does_not_redo_its_journaled_combines() -> None:
    sim = Sim(CONFIG)
    sim.connect(hello("w1", capacity=8, prefetch=0))
    plan = PlanSpec((MapStage("multiply_by", encode({"factor": 2})), FoldStage("sum")))
    d = sim.start(plan)
    sim.inputs(d, [encode(x) for x in range(30)])
    sim.end_input(d)
    for _ in range(4):
        sim.step()
    combines_before = sum(1 for _, t in sim.log if t.stage == -1)
    assert combines_before > 0
    records = sim.journal[d.id][2]
    done_before = replay(d.id, plan, records, max_fold_operands=3, now=0.0)[0].tasks_done

    new = restart(sim)
    new.log = []
    new.held = {}
    new.connect(hello("w2", capacity=8, prefetch=0))
    new.run()
    view = new.directives[d.id]
    assert view.state is DirectiveState.DONE
    assert decode(view.fold_value) == sum(2 * x for x in range(30))
    # Every task the new core ran had no journaled outcome.
    assert done_before + len(new.log) == new.router.stats.dispatched + done_before


def test_replay_emits_the_same_items_in_the_same_order() -> None:
    sim = Sim(CONFIG, seed=3)
    sim.connect(hello("w1", capacity=3, prefetch=1))
    plan = PlanSpec((MapStage("fib_at"), MapStage("multiply_by", encode({"factor": 3}))))
    d = sim.start(plan)
    for chunk in range(5):
        sim.inputs(d, [encode(x) for x in range(chunk * 7, chunk * 7 + 7)])
        sim.step(limit=2)
    _, _, items = replay(d.id, plan, sim.journal[d.id][2], max_fold_operands=3, now=0.0)
    assert items.indexes == d.items.indexes and items.values == d.items.values


def test_a_cancelled_directive_is_restored_finished_and_ends_once() -> None:
    sim = Sim(CONFIG)
    sim.connect(hello("w1"))
    d = sim.start(PlanSpec((MapStage("fib_at"),)))
    sim.inputs(d, [encode(1), encode(2)])
    records = list(sim.journal[d.id][2])
    sim.cancel(d)
    assert d.state is DirectiveState.CANCELLED
    # The crash came after the cancel was journaled but before its end was
    # written down: the new core ends it (once), and nothing runs.
    new = Driver(CONFIG, sim.clock)
    from .sim import DirectiveView

    view = new.directives[d.id] = DirectiveView(d.id)
    new.handle(DirectiveRestored(d.id, sim.journal[d.id][0], sim.journal[d.id][2], 0.0))
    assert view.state is DirectiveState.CANCELLED
    assert not new.router.directives and len(records) < len(sim.journal[d.id][2])


def test_a_leased_channel_goes_on_where_it_stood() -> None:
    sim = Sim(CONFIG)
    sim.connect(hello("w1", capacity=4, prefetch=0))
    ch = sim.lease()
    tasks = [TaskRecord("", i, "length", input=encode("x" * i)) for i in range(10)]
    sim.publish(ch.id, tasks)
    sim.step(limit=3)  # 3 results delivered, 1 task at the worker
    sim.take(ch, 2)  # the subscriber took 2 of them
    sim.close(ch.id)

    new = restart(sim)
    new.log = []
    new.held = {}
    channel = new.router.channels[ch.id]
    assert channel.sender_closed and channel.ids == set(range(10))
    assert len(ch.taken) == 3  # the third came back from the journal on resume
    # A publisher resending what its broken call may have delivered: all left out.
    new.router.channels[ch.id].sender_closed = False
    new.publish(ch.id, [TaskRecord("", i, "length", input=b'""') for i in range(10)])
    new.router.channels[ch.id].sender_closed = True
    new.connect(hello("w2", capacity=4, prefetch=0))
    new.run()
    assert len(new.log) == 7  # the 3 journaled results did not run again
    new.take(ch, 100)
    results = ch.taken
    assert sorted(r.task.task_id for r in results) == list(range(10))
    assert all(decode(r.output) == r.task.task_id for r in results)
    assert ch.ended and not ch.released


def test_a_released_channel_is_gone_from_the_journal() -> None:
    sim = Sim(CONFIG)
    ch = sim.lease()
    sim.publish(ch.id, [TaskRecord("", 1, "length", input=b'""')])
    assert ch.id in sim.channel_journal
    sim.release(ch.id)
    assert ch.id not in sim.channel_journal
    assert ch.id not in restart(sim).router.channels


# ------------------------------------------------------------- randomized


class CrashingChaos(Chaos):
    """The simulation's chaos on a journaling core that is killed at random."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        config = RouterConfig(
            lease_timeout=5, no_worker_timeout=10_000, poison_threshold=3, max_timeouts=2,
            directive_window=40, max_fold_operands=3, fairness_quantum=4,
            max_queued_per_channel=10_000, journal=True,
        )
        self.config = config
        self.d = Driver(config)
        self.d.handle(TenantsChanged(SHARES))
        self.crashes = 0
        self.restored = 0  # directives rebuilt, over all crashes
        self.restored_channels = 0

    def step(self) -> None:
        if self.rng.random() < 0.01:
            self.crash()
            return
        super().step()

    def crash(self) -> None:
        """The core dies; a new one restores from the journal, and some of the
        workers (running on) reconnect to it naming what they hold."""
        self.crashes += 1
        hellos = {w.id: w.hello for w in self.d.router.workers.values()}
        self.stale.clear()
        self.d = restart(self.d, self.config)
        self.d.handle(TenantsChanged(SHARES))  # as a start reads the tenants file
        self.restored += len(self.d.router.directives)
        self.restored_channels += sum(not c.directive for c in self.d.router.channels.values())
        for worker_id, base in hellos.items():
            if self.rng.random() < 0.6:
                self.rejoin(worker_id, base)
            else:
                self.held.pop(worker_id, None)
        self.held = {w: h for w, h in self.held.items() if w in self.d.router.workers}


@pytest.mark.parametrize("seed", range(60))
def test_random_crashes_lose_nothing_and_deliver_each_element_once(seed: int) -> None:
    chaos = CrashingChaos(seed)
    for _ in range(600):
        chaos.step()
    chaos.crash()  # at least one, and one just before the end
    chaos.settle()
    for s in chaos.directives:
        view = s.view
        assert view.end is not None, f"directive {view.id} never ended"
        seen = view.items.indexes + [i for i, _ in view.items.skipped]
        assert len(seen) == len(set(seen)), f"directive {view.id} emitted an index twice"
        if view.state is not DirectiveState.DONE:
            continue
        if isinstance(s.stages[-1], FoldStage):
            assert decode(view.fold_value) == sum(expected(s.stages, x) for x in s.inputs)
        else:
            assert sorted(seen) == list(range(len(s.inputs))), f"directive {view.id}"
            for index, value in zip(view.items.indexes, view.items.values, strict=True):
                assert decode(value) == expected(s.stages, s.inputs[index])
    for c in chaos.channels:
        ids = [r.task.task_id for r in c.view.taken + c.view.results]
        assert len(ids) == len(set(ids)), f"channel {c.view.id} delivered a result twice"
        assert set(ids) <= c.task_ids
        if not c.released:
            assert c.view.ended and set(ids) == c.task_ids, f"channel {c.view.id} lost results"
            for r in c.view.taken + c.view.results:
                assert r.task.routing_key == c.view.id
    assert not chaos.d.router.directives
    assert chaos.crashes >= 1


def test_the_random_crashes_do_restore_running_directives_and_channels() -> None:
    restored = channels = 0
    for seed in range(10):
        chaos = CrashingChaos(seed)
        for _ in range(600):
            chaos.step()
        restored += chaos.restored
        channels += chaos.restored_channels
    assert restored >= 20 and channels >= 20
