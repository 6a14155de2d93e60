"""What the routing core refuses, checked before an event changes anything.

Each check returns a :class:`Refused` instruction naming what was wrong, or
None when the request may go ahead. Pure functions over the core's state.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Set
from typing import TYPE_CHECKING, Protocol

from orchestrator_service._channel import Channel
from orchestrator_service._events import Refused
from orchestrator_service._model import (
    APPLY,
    COMBINE,
    Code,
    FoldStage,
    PlanSpec,
    QueueKey,
    RouterConfig,
    TaskRecord,
    TenantShare,
    WorkerHello,
)

if TYPE_CHECKING:
    from orchestrator_service._directive import Directive


class Offers(Protocol):
    """What admission reads of a connected worker."""

    @property
    def hello(self) -> WorkerHello: ...


def check_hello(
    hello: WorkerHello, workers: Mapping[str, Offers], config: RouterConfig
) -> Refused | None:
    name = hello.worker_id
    if not name:
        return Refused(Code.INVALID_ARGUMENT, "worker hello has an empty worker_id")
    if not hello.operations and not hello.monoids:
        return Refused(
            Code.INVALID_ARGUMENT, f"worker {name!r} offers no operations and no monoids"
        )
    if hello.capacity < 1:
        return Refused(Code.INVALID_ARGUMENT, f"worker {name!r} has capacity 0")
    if name in workers:
        return Refused(
            Code.ALREADY_EXISTS, f"a worker with id {name!r} is already connected"
        )
    if len(workers) >= config.max_workers:
        return Refused(
            Code.RESOURCE_EXHAUSTED,
            f"max_workers limit reached ({config.max_workers} connected)",
        )
    return None


def check_accepting(accepting: bool) -> Refused | None:
    if accepting:
        return None
    return Refused(Code.UNAVAILABLE, "the orchestrator is shutting down and takes no new work")


def check_tenant_directives(
    tenant: str, shares: Mapping[str, TenantShare], running: Iterable[Directive]
) -> Refused | None:
    share = shares.get(tenant)
    if share is None or share.max_directives is None:
        return None
    count = sum(1 for d in running if d.plan.tenant == tenant)
    if count < share.max_directives:
        return None
    return Refused(
        Code.RESOURCE_EXHAUSTED,
        f"tenant {tenant!r} runs {count} directives, its max_directives "
        f"({share.max_directives}, the tenants file); wait for one to finish",
    )


def check_plan(plan: PlanSpec, workers: Mapping[str, Offers]) -> Refused | None:
    if not plan.stages:
        return Refused(Code.INVALID_ARGUMENT, "plan has no stages")
    for position, stage in enumerate(plan.stages):
        name = stage.monoid if isinstance(stage, FoldStage) else stage.operation
        if not name:
            what = "monoid" if isinstance(stage, FoldStage) else "operation"
            return Refused(Code.INVALID_ARGUMENT, f"plan stage {position} names no {what}")
        if isinstance(stage, FoldStage) and position != len(plan.stages) - 1:
            return Refused(
                Code.INVALID_ARGUMENT,
                f"plan stage {position}: {stage.describe()} must be the last stage",
            )
    if not workers:
        return None
    hellos = [w.hello for w in workers.values()]
    fold = plan.fold
    if fold is not None:
        offered_as_monoid = any(fold.monoid in h.monoids for h in hellos)
        offered_as_op = any(fold.monoid in h.operations for h in hellos)
        if offered_as_op and not offered_as_monoid:
            return Refused(
                Code.INVALID_ARGUMENT,
                f"fold({fold.monoid}): {fold.monoid!r} is an operation, not a monoid",
            )
    # The mirror image: map("sum") would wait the whole no-worker timeout
    # for a worker offering an operation 'sum' while the workers offer it
    # as a monoid.
    for stage in plan.stages:
        if isinstance(stage, FoldStage):
            continue
        name = stage.operation
        if (any(name in h.monoids for h in hellos)
                and not any(name in h.operations for h in hellos)):
            return Refused(
                Code.INVALID_ARGUMENT,
                f"map({name}): {name!r} is a monoid, not an operation; fold with it: "
                f"fold({name!r})",
            )
    return None


def check_publish(
    channel: Channel | None, channel_id: str, tasks: list[TaskRecord], config: RouterConfig
) -> Refused | None:
    if channel is None:
        return unknown_channel(channel_id)
    if channel.directive:
        return Refused(
            Code.FAILED_PRECONDITION,
            f"channel {channel_id!r} belongs to a directive; publish through RunDirective",
        )
    if channel.sender_closed:
        return Refused(
            Code.FAILED_PRECONDITION, f"channel {channel_id!r} is closed for publishing"
        )
    # A hard cap next to the publish backpressure: results nobody takes
    # would otherwise pile up without bound.
    pending = len(channel.pending_ids) + channel.unread
    limit = config.max_pending_per_channel
    if pending + len(tasks) > limit:
        return Refused(
            Code.RESOURCE_EXHAUSTED,
            f"max_pending_per_channel limit reached: channel {channel_id!r} holds {pending} "
            f"tasks without a taken result and {len(tasks)} more would pass {limit}; "
            "take results before publishing more",
        )
    seen: set[int] = set()
    for task in tasks:
        if not task.operation:
            return Refused(Code.INVALID_ARGUMENT, f"task {task.task_id}: operation is empty")
        if task.kind not in (APPLY, COMBINE):
            return Refused(
                Code.INVALID_ARGUMENT, f"task {task.task_id}: unknown task kind {task.kind}"
            )
        if task.task_id in seen:
            return Refused(
                Code.INVALID_ARGUMENT,
                f"task id {task.task_id} appears twice in one PublishRequest "
                f"(channel {channel_id!r})",
            )
        seen.add(task.task_id)
    return None


def unknown_channel(channel_id: str) -> Refused:
    return Refused(
        Code.NOT_FOUND, f"unknown channel id {channel_id!r} (never leased or released)"
    )


def unserved(key: QueueKey, offered: Set[QueueKey], timeout: float, *, failed: bool) -> str:
    """Why tasks of ``key`` wait (or failed): no connected worker offers it.

    When no worker ever offered the name but one offered a close name of the
    same kind, the message asks "did you mean ...?" (a typo in a plan waits
    the whole timeout otherwise, in silence).
    """
    kind, name = key
    what = "monoid" if kind == COMBINE else "operation"
    if failed:
        text = f"no connected worker offers {what} {name!r} (waited {timeout:g} s)"
    else:
        text = f"waiting for a worker that offers {what} {name!r} (fails after {timeout:g} s)"
    if key not in offered:
        names = sorted(n for k, n in offered if k == kind)
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        if close:
            text += f"; did you mean {close[0]!r}?"
    return text
