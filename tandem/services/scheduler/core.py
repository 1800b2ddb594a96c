"""The central scheduler's pure core: a waiting queue, the workers as their heartbeats
describe them, and one token-budget plan per prefill worker per step.

Pure Python (no NATS, no protobuf, no asyncio); the clock is injected. The service shell
feeds it heartbeats, submissions, step reports and preemptions, and sends the plans it makes.

Placement: a waiting request goes to the first prefill worker with a free plan slot (each
worker holds at most `plans_ahead` plans: the one it runs and the next, so it never waits on
the network) and to the decode worker with the fewest requests (running, waiting and in
transit), among those under their `max_num_seqs` and with room for the prompt's blocks. A
request that fits no decode worker waits: that is admission control.

Conditional disaggregation: while no prefill worker has work, a request with at most
`max_local_prefill_length` prompt tokens not cached on its decode worker goes to that worker
alone, which prefills it itself (_prefills_locally).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from tandem.engine.config import SchedulingPolicy
from tandem.engine.scheduler import WaitingQueue
from tandem.services.scheduler.state import (  # noqa: F401 (the core's vocabulary, re-exported)
    KVLayout,
    Overloaded,
    PendingRequest,
    Plan,
    PlannedChunk,
    Role,
    Router,
    WorkerState,
    route,
)
from tandem.utils import cdiv

PLACED_TTL = 10.0  # seconds a placement stands in for the index
PLAN_LOST_AFTER = 3.0  # seconds after its last plan an idle prefill worker's plans are lost


class ClusterScheduler:
    """Decides which prefill worker computes how many tokens of which request, and which
    decode worker takes it afterwards."""

    def __init__(
        self,
        policy: SchedulingPolicy = SchedulingPolicy.FCFS,
        worker_timeout: float = 5.0,
        plans_ahead: int = 2,
        transit_timeout: float = 60.0,
        router: Router = Router.KV_AWARE,
        overlap_weight: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_queued_requests: int | None = None,
        max_queued_tokens: int | None = None,
        no_worker_timeout: float = 30.0,
        max_local_prefill_length: int = 0,
    ) -> None:
        self.router = router
        self.max_local_prefill_length = max_local_prefill_length
        # placed on a decode worker to prefill itself, until it says the request arrived
        self.local: dict[str, PendingRequest] = {}
        self.placed_local: list[PendingRequest] = []  # to send (take_local)
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.overlap_weight = overlap_weight
        # Blocks of requests placed lately, per worker: the index learns of them only once
        # the worker computed them, and a request with the same new prefix arriving in
        # between should follow the first one rather than compute it a second time.
        self.placed_blocks: dict[str, dict[int, float]] = {}
        self._turns = {Role.PREFILL: itertools.count(), Role.DECODE: itertools.count()}
        self.waiting = WaitingQueue(policy)
        self.workers: dict[str, WorkerState] = {}
        self.kv_layout = KVLayout()
        self.prefilling: dict[str, PendingRequest] = {}  # placed on a prefill worker
        self.lost_handed: dict[str, list[str]] = {}  # expired worker -> handed, unreceived
        self.next_step_id = 0  # plans are numbered across workers: a number is never reused
        self.worker_timeout = worker_timeout
        self.plans_ahead = plans_ahead
        self.transit_timeout = transit_timeout
        self.clock = clock
        # A role with no worker taking requests fails the queue only after this long: a
        # restarted or newly scheduled worker joins within it (counted from start-up too).
        self.no_worker_timeout = no_worker_timeout
        self._no_worker_since: dict[Role, float] = {role: clock() for role in Role}

    # -- what the workers say ------------------------------------------------------------

    def on_heartbeat(
        self, worker_id: str, role: Role, received_ids=(), **load: int | str
    ) -> str | None:
        """Record a worker's load (WorkerState's fields by name). A decode worker lists the
        hand-offs it received since its previous heartbeat: they stop being in transit.
        A worker whose KV blocks differ from its peers' (block size, element type) is
        refused: why, or None."""
        refused = self.kv_layout.check(
            worker_id, load.get("block_size"), load.get("kv_cache_dtype"), bool(self.workers)
        )
        if refused:
            return refused
        worker = self.workers.get(worker_id)
        if worker is None or worker.role is not role:
            worker = self.workers[worker_id] = WorkerState(worker_id, role)
        for name, value in load.items():
            setattr(worker, name, value)
        worker.last_seen = self.clock()
        if not worker.draining:
            self._no_worker_since.pop(role, None)
        for request_id in received_ids:
            worker.in_transit.pop(request_id, None)
            self.local.pop(request_id, None)
        if role is Role.PREFILL:
            self._recover_lost_plans(worker)
        return None

    def _recover_lost_plans(self, worker: WorkerState) -> None:
        """A prefill worker that says it has nothing to do (no plan queued, nothing
        unfinished) while plans sent to it long ago are unreported never got them, or its
        reports were lost (NATS restarted in between): its placed requests are planned
        again from their start. Idle, it holds nothing of them, so nothing is doubled."""
        if (
            worker.plans_in_flight
            and worker.num_running == 0
            and worker.num_waiting == 0
            and self.clock() - worker.last_plan_at > PLAN_LOST_AFTER
        ):
            worker.plans_in_flight = 0
            for request in self._prefill_queue(worker):
                request.num_planned = 0

    def on_report(
        self,
        worker_id: str,
        prefilled_ids=(),
        finished_ids=(),
        failed_ids=(),
        refused_ids=(),
        step_id: int | None = None,
        local: bool = False,
    ) -> list[PendingRequest]:
        """A prefill worker ran a plan (`step_id`): prefilled requests are on their way to
        their decode worker, finished ones ended there, failed ones (no blocks) wait again.
        A refused one (the worker could not run it) waits again once, placed elsewhere when
        another worker can take it; refused a second time, it is returned: the caller ends
        it. A report speaks only of requests placed on that worker, by that plan or an
        earlier one: never of one placed again since. A `local` report is of a step the
        worker made itself (a request's last token once its grammar compiled): no plan of
        ours ended."""
        worker = self.workers.get(worker_id)
        if worker is not None and not local:
            worker.plans_in_flight = max(0, worker.plans_in_flight - 1)

        def placed_here(request_id: str) -> PendingRequest | None:
            request = self.prefilling.get(request_id)
            if request is None or request.prefill_worker_id != worker_id:
                return None
            if step_id is not None and request.placed_step > step_id:
                return None
            return self.prefilling.pop(request_id)

        for request_id in prefilled_ids:  # in transit to their decode worker since placed
            placed_here(request_id)
        given_up = []
        for request_id in (*finished_ids, *failed_ids, *refused_ids):
            request = placed_here(request_id)
            if request is None:
                continue
            decode = self.workers.get(request.decode_worker_id)
            if decode is not None:
                decode.in_transit.pop(request_id, None)
            if request_id in refused_ids:
                if request.refused_by:
                    given_up.append(request)
                    continue
                request.refused_by.add(worker_id)
            if request_id in failed_ids or request_id in refused_ids:
                self._requeue(request)
        return given_up

    # -- requests --------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        """The longest context every live worker takes (0 while none is known)."""
        lens = [w.max_model_len for w in self._live()]
        return min(lens) if lens else 0

    def add_request(self, request: PendingRequest, front: bool = False) -> None:
        """Queue a request (a new one, or one a decode worker preempted: then `front`).
        Raises ValueError when no worker could ever hold it."""
        limit = self.max_model_len
        vocabs = [w.vocab_size for w in self._live() if w.vocab_size]
        if vocabs and any(not 0 <= t < min(vocabs) for t in request.token_ids):
            raise ValueError(f"token ids must be in [0, {min(vocabs)})")
        if limit and request.num_tokens >= limit + request.pooling:  # pooling: none generated
            raise ValueError(
                f"prompt has {request.num_tokens} tokens; max_model_len is {limit} "
                "and at least one token must be generated"
            )
        if not front:  # a request coming back was admitted once: it is never refused
            self._admit(request)
        self.waiting.add(request, front=front)

    def _admit(self, request: PendingRequest) -> None:
        """Raise Overloaded when the queue is at a bound, or no worker could start it."""
        if self.max_queued_requests is not None and len(self.waiting) >= self.max_queued_requests:
            raise Overloaded(f"the queue holds {len(self.waiting)} requests (the maximum)")
        queued = sum(r.num_tokens for r in self.waiting)
        limit = self.max_queued_tokens
        if limit is not None and queued + request.num_tokens > limit:
            raise Overloaded(f"the queue holds {queued} tokens (at most {limit})")
        for role in (Role.PREFILL,) if request.pooling else Role:  # pooling: prefill only
            if not self._accepting(role):
                raise Overloaded(f"no {role.value} worker is available")

    def abort(self, request_id: str) -> bool:
        """Forget a request wherever it is here. True when it was known."""
        found = self.prefilling.pop(request_id, None) is not None
        found |= self.local.pop(request_id, None) is not None
        if not found:
            request = next((r for r in self.waiting if r.request_id == request_id), None)
            if request is not None:
                self.waiting.remove(request)
                found = True
        for worker in self.workers.values():
            found |= worker.in_transit.pop(request_id, None) is not None
        return found

    def stranded(self) -> list[PendingRequest]:
        """Waiting requests that no worker can take (every worker of a role has been gone
        or leaving for `no_worker_timeout`): taken out of the queue, to be failed rather
        than wait forever."""
        now = self.clock()
        for role in Role:  # a worker taking requests clears its role's entry (on_heartbeat)
            if not self._accepting(role):
                self._no_worker_since.setdefault(role, now)
        if all(now - t < self.no_worker_timeout for t in self._no_worker_since.values()):
            return []
        out = list(self.waiting)
        for request in out:
            self.waiting.remove(request)
        return out

    def _requeue(self, request: PendingRequest) -> None:
        request.prefill_worker_id = request.decode_worker_id = ""
        request.num_planned = 0
        self.waiting.add(request, front=True)

    # -- planning --------------------------------------------------------------------------

    def _live(self, role: Role | None = None) -> list[WorkerState]:
        now = self.clock()
        return [
            w
            for w in self.workers.values()
            if now - w.last_seen <= self.worker_timeout and (role is None or w.role is role)
        ]

    def _accepting(self, role: Role) -> list[WorkerState]:
        """Live workers of a role that take new requests (not draining)."""
        return [w for w in self._live(role) if not w.draining]

    def drain(self, worker_id: str) -> int | None:
        """A worker is leaving: place nothing more on it. Returns how many requests placed
        on it have not reached it yet (prefill: not prefilled; decode: in transit), or None
        for a worker this scheduler does not know."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return None
        worker.draining = True
        if worker.role is Role.PREFILL:
            return len(self._prefill_queue(worker))
        return len(worker.in_transit)

    def remove_worker(self, worker_id: str) -> bool:
        """Forget a worker that left (or went silent); requests placed on it as their prefill
        worker wait again. True when it was known."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return False
        for placed, key in (self.prefilling, "prefill_worker_id"), (self.local, "decode_worker_id"):
            for request in [r for r in placed.values() if getattr(r, key) == worker_id]:
                del placed[request.request_id]
                self._requeue(request)
        self.placed_blocks.pop(worker_id, None)
        return True

    def expire(self) -> list[str]:
        """Drop workers whose heartbeats stopped and transfers that never arrived. Requests
        placed on a dropped prefill worker wait again. Returns the dropped worker ids."""
        now = self.clock()
        dead = [w for w in self.workers.values() if now - w.last_seen > self.worker_timeout]
        for worker in dead:  # its in-transit requests go out with its WorkerLost
            self.lost_handed[worker.worker_id] = list(worker.in_transit.keys() - self.local.keys())
            self.remove_worker(worker.worker_id)
        for worker in self.workers.values():
            stale = [r for r, (_, t) in worker.in_transit.items() if now - t > self.transit_timeout]
            for request_id in stale:
                del worker.in_transit[request_id]
                if request_id in self.local:  # its message never reached the worker
                    self._requeue(self.local.pop(request_id))
        for worker_id in list(self.placed_blocks):
            if worker_id not in self.workers:
                del self.placed_blocks[worker_id]
                continue
            placed = self.placed_blocks[worker_id]  # the index knows them by now
            for block_hash in [h for h, t in placed.items() if now - t > PLACED_TTL]:
                del placed[block_hash]
        return [w.worker_id for w in dead]

    def _decode_load(self, worker: WorkerState) -> int:
        return worker.num_running + worker.num_waiting + len(worker.in_transit)

    def _pick_decode(self, request: PendingRequest) -> WorkerState | None:
        """The decode worker for a request: among those under max_num_seqs with room for its
        blocks, the least loaded, or (kv-aware) the best by cached overlap against load."""
        candidates = []
        for worker in self._accepting(Role.DECODE):
            load = self._decode_load(worker)
            blocks_in_transit = sum(b for b, _ in worker.in_transit.values())
            blocks_needed = cdiv(request.num_tokens + 1, max(worker.block_size, 1))
            if load >= worker.max_num_seqs:
                continue
            if worker.num_free_blocks - blocks_in_transit < blocks_needed and load > 0:
                continue  # an idle worker always takes one: it cannot do better later
            candidates.append(worker)
        return self._route(request, candidates, self._decode_load, Role.DECODE)

    def _prefill_queue(self, worker: WorkerState) -> list[PendingRequest]:
        return [r for r in self.prefilling.values() if r.prefill_worker_id == worker.worker_id]

    def _cached_tokens(self, request: PendingRequest, worker: WorkerState) -> int:
        """Leading tokens of the request the worker should find in its cache (at least one
        token is always computed)."""
        cached = self._overlap(request, worker.worker_id) * worker.block_size
        return min(cached, request.num_tokens - 1)

    def _unplanned_tokens(self, worker: WorkerState) -> int:
        """Tokens placed on a prefill worker that it will compute and that are in no plan
        yet (a request's expected cache hits are no work)."""
        return sum(
            max(r.num_tokens - max(r.num_planned, self._cached_tokens(r, worker)), 0)
            for r in self._prefill_queue(worker)
        )

    def _prefill_load(self, worker: WorkerState) -> int:
        """Prompt tokens placed on a prefill worker, not reported prefilled yet and not
        expected to be found in its cache: the work it has queued."""
        return sum(
            r.num_tokens - self._cached_tokens(r, worker) for r in self._prefill_queue(worker)
        )

    def _overlap(self, request: PendingRequest, worker_id: str) -> int:
        """Leading blocks of the request the worker holds: per the index, or because a
        request placed there lately had them (whichever is longer). Once the request is
        placed on the worker, what was expected then: its own blocks are no hit."""
        if request.prefill_worker_id == worker_id and request.request_id in self.prefilling:
            return request.cached_blocks
        placed = self.placed_blocks.get(worker_id, {})
        num_placed = 0
        for block_hash in request.block_hashes:
            if block_hash not in placed:
                break
            num_placed += 1
        return max(request.overlap.get(worker_id, 0), num_placed)

    def _remember(self, request: PendingRequest, *workers: WorkerState) -> None:
        now = self.clock()
        for worker in workers:
            placed = self.placed_blocks.setdefault(worker.worker_id, {})
            for block_hash in request.block_hashes:
                placed[block_hash] = now

    def _pick_prefill(self, request: PendingRequest) -> WorkerState | None:
        """The prefill worker for a request, among those with less than `plans_ahead` steps
        of work queued (the rest waits here, so placement binds late) and room for its
        blocks."""
        candidates = []
        for worker in self._accepting(Role.PREFILL):
            queue = self._prefill_queue(worker)
            if len(queue) >= worker.max_num_seqs:
                continue
            if self._unplanned_tokens(worker) >= self.plans_ahead * worker.max_num_batched_tokens:
                continue
            if queue and self._new_blocks(request, worker) > self._prefill_room(worker, queue):
                continue  # wait for this worker's blocks to come back
            candidates.append(worker)
        others = [w for w in candidates if w.worker_id not in request.refused_by]
        if request.refused_by and not others and len(self._accepting(Role.PREFILL)) > 1:
            return None  # another worker may take it once it has room
        return self._route(request, others or candidates, self._prefill_load, Role.PREFILL)

    def _route(
        self, request: PendingRequest, candidates: list[WorkerState], load, role: Role
    ) -> WorkerState | None:
        overlap = lambda w: self._overlap(request, w.worker_id) * w.block_size  # noqa: E731
        return route(self.router, self._turns[role], request, candidates, load, overlap,
                     self.overlap_weight)  # fmt: skip

    def _new_blocks(self, request: PendingRequest, worker: WorkerState) -> int:
        """Blocks the request takes on the worker beyond the cached ones it will share."""
        blocks = cdiv(request.num_tokens, max(worker.block_size, 1))
        return blocks - self._overlap(request, worker.worker_id)

    def _prefill_room(self, worker: WorkerState, placed: list[PendingRequest]) -> int:
        """Blocks the worker can still give to new requests, counting those placed on it."""
        return worker.num_free_blocks - sum(self._new_blocks(r, worker) for r in placed)

    def schedule(self) -> list[Plan]:
        """Place waiting requests (in queue order, while a prefill and a decode worker take
        them), then make one plan for each prefill worker with a free slot and work to do."""
        while len(self.waiting):
            request = self.waiting.peek()
            decode = None if request.pooling else self._pick_decode(request)
            if decode is not None and self._prefills_locally(request, decode):
                self._place(self.waiting.pop(), decode, local=True)
                self.placed_local.append(request)
                continue
            found = request.pooling or decode is not None
            prefill = self._pick_prefill(request) if found else None
            if prefill is None:
                break
            self.waiting.pop()
            request.cached_blocks = self._overlap(request, prefill.worker_id)
            request.prefill_worker_id = prefill.worker_id
            request.decode_worker_id = "" if decode is None else decode.worker_id
            request.num_planned = 0
            request.placed_step = self.next_step_id  # its first plan is this one or later
            self.prefilling[request.request_id] = request
            if decode is None:  # a pooling request ends on its prefill worker
                self._remember(request, prefill)
                continue
            self._remember(request, prefill)
            self._place(request, decode)
        plans = []
        for worker in sorted(self._live(Role.PREFILL), key=lambda w: w.plans_in_flight):
            while worker.plans_in_flight < self.plans_ahead:
                plan = self._plan_for(worker)
                if not plan.chunks:
                    break
                worker.plans_in_flight += 1
                worker.last_plan_at = self.clock()
                self.next_step_id += 1
                plans.append(plan)
        return plans

    def _prefills_locally(self, request: PendingRequest, decode: WorkerState) -> bool:
        """Whether the decode worker prefills the request itself: few tokens not cached there
        (<= max_local_prefill_length: a hand-off costs more than it saves) and no prefill
        worker has work (then a prefill on the decode worker would slow its batch down)."""
        if self.prefilling:
            return False
        uncached = request.num_tokens - self._cached_tokens(request, decode)
        return uncached <= self.max_local_prefill_length

    def _place(self, request: PendingRequest, decode: WorkerState, local: bool = False) -> None:
        """The request is on its way to its decode worker (from its prefill worker, or,
        `local`, as is: held in self.local until the worker says it arrived)."""
        self._remember(request, decode)
        blocks = cdiv(request.num_tokens + 1, max(decode.block_size, 1))
        decode.in_transit[request.request_id] = (blocks, self.clock())
        request.decode_worker_id = decode.worker_id
        if local:
            request.prefill_worker_id, self.local[request.request_id] = "", request

    def take_local(self) -> list[PendingRequest]:
        """The requests placed on decode workers to prefill themselves since the last call."""
        out, self.placed_local = self.placed_local, []
        return out

    def _plan_for(self, worker: WorkerState) -> Plan:
        """The next chunks of the requests placed on `worker`, in order, under its budget.

        A chunk counts the tokens the worker will compute: a request's first chunk also
        spans the prefix the worker is expected to hold (it computes min(chunk, what is
        left after its real cache hits), so a stale expectation costs one larger step,
        never a request left unfinished)."""
        budget = worker.max_num_batched_tokens
        chunks: list[PlannedChunk] = []
        for request in self._prefill_queue(worker):
            if budget <= 0:
                break
            free = self._cached_tokens(request, worker) if request.num_planned == 0 else 0
            if request.pooling and request.num_planned == 0:
                # planned whole (its pooling may need every row in one step) when it fits
                # a step at all; else chunked (LAST pooling: the worker refuses the others)
                free = 0
                if budget < request.num_tokens <= worker.max_num_batched_tokens:
                    break
            num = min(request.num_tokens - request.num_planned, budget + free)
            if num > 0:
                if request.num_planned == 0:
                    request.placed_step = self.next_step_id
                chunks.append(PlannedChunk(request, num, is_first=request.num_planned == 0))
                request.num_planned += num
                budget -= max(num - free, 0)
        return Plan(worker.worker_id, self.next_step_id, chunks)
