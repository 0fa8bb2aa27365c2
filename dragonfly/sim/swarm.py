"""A swarm of simulated hosts driving the real scheduler and the real download machine.

Each simulated host runs the peer's own ``DownloadMachine`` (dragonfly/engine/machine.py)
and performs its actions in a model of the network instead of with sockets and a disk:
``Send`` goes to the real ``Scheduler`` (``handle()``) after ``latency``; ``Subscribe``
makes the parent's machine announce to this one; ``Fetch`` and ``FetchOrigin`` start
flows between endpoints; ``OpenTask`` and ``Complete`` succeed at once (no disk). No
decision of a peer is written here: what to fetch, from whom, when to time out, report,
reschedule or go to the origin, how a parent staggers its announcements — all of it is
the machine's, as in the daemon.

What is modelled and what is not:

* bandwidth: see dragonfly/sim/engine.py (fair shares of each uplink and downlink, and a
  parent's upload slots; a request beyond the slots and the queue is refused at once, as
  the real upload server answers 503, by the same rule: dragonfly/engine/admission.py);
* control messages (peer ↔ scheduler) take ``latency`` seconds one way; a probe of the
  origin takes one round trip; announcements and piece requests start at once (their
  latency is folded into the transfer);
* departures (``SimConfig.departures``: a peer leaves before it finishes, LeaveHost, its
  children's requests and announcements end) and crashes (``crashes``: its host dies
  silently; its children find out by their requests' timeouts, the scheduler after
  ``detect_after``); late arrivals by a Poisson process (``arrival``);
* not modelled: bad digests, origin errors, disks.
"""

from __future__ import annotations

import hashlib
import time
from itertools import chain
from random import Random

from dragonfly.engine.actions import (
    Action,
    Announce,
    Cancel,
    Complete,
    Failed,
    Fetch,
    FetchOrigin,
    Finished,
    MachineConfig,
    OpenTask,
    ProbeOrigin,
    RangesDone,
    Send,
    Stalled,
    StreamOrigin,
    Subscribe,
    Unsubscribe,
)
from dragonfly.engine.admission import Admission
from dragonfly.engine.machine import DownloadMachine
from dragonfly.identity import IdentityError, check_piece_length
from dragonfly.sched.scheduler import Scheduler
from dragonfly.sched.scheduler import Send as Decision
from dragonfly.sim.bound import piece_factor
from dragonfly.sim.engine import INF, Endpoint, EventLoop, Flow, make_network
from dragonfly.sim.scenario import URL, SimConfig, SimResult
from dragonfly.wire.codec import Message
from dragonfly.wire.messages import Error, HostInfo, LeaveHost, TaskSpec, TriggerDownload

__all__ = ["Swarm", "run_simulation"]

# More ticks of one machine at one moment than any of its rules needs (a stall step or
# two): the simulation stops with an error instead of looping without end.
_TICKS_AT_ONE_MOMENT = 100


class SimNode:
    """One simulated host and its download of the task: the real ``DownloadMachine``,
    whose actions are performed in the model of the network (flows between endpoints,
    message latency) instead of with sockets and a disk."""

    __slots__ = (
        "admission",
        "arrived",
        "children",
        "dead",
        "ep",
        "finished_at",
        "flows",
        "host_id",
        "info",
        "machine",
        "origin_bytes",
        "parents",
        "peer_id",
        "revealed_all",
        "seed",
        "sw",
        "ticked_at",
        "ticks_here",
        "wake_at",
    )

    def __init__(self, sw: Swarm, host_id: str, *, seed: bool) -> None:
        cfg = sw.cfg
        self.sw = sw
        self.host_id = host_id
        self.peer_id = f"{host_id}-p"
        self.seed = seed
        self.ep = Endpoint(
            host_id,
            cfg.peer_up,
            cfg.peer_down if cfg.peer_down is not None else INF,
            cfg.upload_slots,
        )
        self.admission = Admission(slots=cfg.upload_slots, queue_limit=cfg.upload_queue)
        self.info = HostInfo(
            host_id=host_id,
            hostname=host_id,
            ip="10.0.0.1",
            upload_port=4000,
            seed=seed,
            upload_limit=cfg.upload_children,
            upload_rate=int(cfg.peer_up),
        )
        self.machine: DownloadMachine | None = None
        self.arrived = 0.0
        self.finished_at = INF
        self.origin_bytes = 0
        self.flows: dict[int, Flow] = {}  # fetch id -> the piece's flow from a parent
        self.parents: dict[str, SimNode] = {}  # subscribed to
        self.children: dict[str, SimNode] = {}  # subscribed to this node
        self.wake_at = INF  # the earliest tick already scheduled
        self.ticked_at = -INF  # when the machine last ticked, and how often since at that time
        self.ticks_here = 0
        self.revealed_all = False
        self.dead = False  # left, or its host died: it does nothing any more

    @property
    def done(self) -> bool:
        return self.machine is not None and self.machine.finished

    @property
    def failed(self) -> bool:
        return self.machine is not None and self.machine.error is not None

    @property
    def registered(self) -> bool:
        return self.machine is not None

    @property
    def count(self) -> int:
        return len(self.machine.have) if self.machine is not None else 0

    # -- arrival and scheduler messages ----------------------------------------------

    def arrive(self, _: object = None) -> None:
        """A peer host starts: Hello to the scheduler, then RegisterPeer for the task."""
        sw = self.sw
        self.arrived = sw.loop.now
        sw.scheduler.host_connected(self.info, sw.loop.now)
        self._start(seed_trigger=False)

    def _start(self, *, seed_trigger: bool) -> None:
        sw = self.sw
        self.machine = DownloadMachine(
            sw.task_id,
            self.peer_id,
            sw.spec,
            config=sw.machine_config,
            seed_trigger=seed_trigger,
        )
        self.perform(self.machine.connected(sw.loop.now))

    def receive(self, msg: Message) -> None:
        if self.dead:
            return
        kind = type(msg)
        if kind is TriggerDownload:
            if self.machine is None:  # (a repeated trigger of a started task is moot)
                self.arrived = self.sw.loop.now
                self._start(seed_trigger=True)
        elif kind is Error:
            self.sw.errors.append(f"{self.host_id}: {msg}")
        elif self.machine is not None:
            self.perform(self.machine.scheduler_message(msg, self.sw.loop.now))

    # -- performing the machine's actions --------------------------------------------

    def perform(self, actions: list[Action]) -> None:
        machine = self.machine
        assert machine is not None
        if self.dead:
            return
        sw = self.sw
        now = sw.loop.now
        for action in actions:
            kind = type(action)
            if kind is Fetch:
                assert isinstance(action, Fetch)
                self._fetch(action)
            elif kind is Announce:
                assert isinstance(action, Announce)
                child = self.children.get(action.child)  # type: ignore[call-overload]
                if child is not None and child.machine is not None:
                    child.perform(child.machine.parent_announced(self.peer_id, action.numbers, now))
            elif kind is Send:
                assert isinstance(action, Send)
                sw.to_scheduler(self.host_id, action.message)
            elif kind is Cancel:
                assert isinstance(action, Cancel)
                flow = self.flows.pop(action.fetch_id, None)
                if flow is not None:
                    sw.wasted += sw.net.cancel(flow)
            elif kind is Subscribe:
                assert isinstance(action, Subscribe)
                parent = sw.nodes[action.parent.host_id]
                self.parents[action.parent.peer_id] = parent
                parent.subscribe(self)
            elif kind is Unsubscribe:
                assert isinstance(action, Unsubscribe)
                gone = self.parents.pop(action.parent_id, None)
                if gone is not None:
                    gone.unsubscribe(self)
            elif kind is OpenTask:
                # No disk: the task opens at once, holding nothing.
                self.perform(machine.task_opened({}, now))
            elif kind is ProbeOrigin:
                if not self.seed:
                    sw.back_to_source += 1
                sw.loop.after(2 * sw.cfg.latency, self._probed)  # a 1-byte range request
            elif kind is FetchOrigin:
                assert isinstance(action, FetchOrigin)
                # One flow however many slices (``parts``): they share the origin's link
                # as one flow would; an origin that caps each connection is not modelled.
                n = action.number
                sw.net.start(sw.origin, self.ep, sw.piece_len(n), self._origin_landed, n)
            elif kind is Complete:
                self.perform(machine.completed(now))
            elif kind is Finished:
                self.finished_at = now
                if not self.seed:
                    sw.finished += 1
                self._end_schedule()
            elif kind is Failed:
                assert isinstance(action, Failed)
                sw.failures.append(f"{self.peer_id}: {action.reason}")
                self._left()
            elif kind is Stalled:
                pass  # counted by the machine (counters.stalls)
            elif kind is StreamOrigin or kind is RangesDone:
                raise AssertionError(f"not modelled: {action}")
        self._schedule_tick()

    def _fetch(self, action: Fetch) -> None:
        sw = self.sw
        parent = self.parents.get(action.parent_id)
        machine = self.machine
        assert machine is not None
        if parent is None or parent.machine is None:
            self.perform(machine.piece_failed(action.fetch_id, "parent gone", sw.loop.now))
            return
        if parent.dead:
            return  # a dead host answers nothing: the request times out
        ep = parent.ep
        # A held-back piece's first copy waits at the head of the queue (the swarm needs
        # it: dragonfly/engine/announce.py), as in the real upload server.
        first = parent.machine.held_back(action.number)
        if parent.admission.refuses(
            self.host_id,
            active=len(ep.uploads),
            waiting=len(ep.queue),
            others=any(f.dst is not self.ep for f in chain(ep.uploads.values(), ep.queue)),
            first=first,
            now=sw.loop.now,
        ):
            # The parent answers 503 at once, as the real one (dragonfly/engine/admission.py).
            self.perform(machine.piece_busy(action.fetch_id, sw.loop.now))
            return
        self.flows[action.fetch_id] = sw.net.start(
            ep, self.ep, sw.piece_len(action.number), self._p2p_landed, action, urgent=first
        )

    def _p2p_landed(self, flow: Flow) -> None:
        action: Fetch = flow.data
        if self.dead:
            return
        if self.flows.pop(action.fetch_id, None) is None:
            return
        sw = self.sw
        now = sw.loop.now
        parent = self.parents.get(action.parent_id)
        if parent is not None and parent.machine is not None:
            parent.perform(parent.machine.piece_uploaded(action.number, now))
        machine = self.machine
        assert machine is not None
        if action.number not in machine.have:
            sw.p2p_bytes += flow.size
            sw.last_progress = now
        self.perform(
            machine.piece_landed(action.fetch_id, action.number, action.parent_id, flow.size, now)
        )

    def _probed(self, _: object) -> None:
        """The origin answered the probe (it takes ranges; one version, no validators)."""
        if self.dead:
            return
        machine = self.machine
        assert machine is not None
        self.perform(machine.origin_probed(self.sw.cfg.size, True, "", "", "", self.sw.loop.now))

    def _origin_landed(self, flow: Flow) -> None:
        number: int = flow.data
        sw = self.sw
        if self.dead:
            return
        sw.origin_bytes += flow.size
        self.origin_bytes += flow.size
        sw.last_progress = sw.loop.now
        machine = self.machine
        assert machine is not None
        self.perform(
            machine.origin_piece_landed(number, sw.digests[number], flow.size, sw.loop.now)
        )

    # -- children ----------------------------------------------------------------------

    def subscribe(self, child: SimNode) -> None:
        machine = self.machine
        assert machine is not None
        self.children[child.peer_id] = child
        self.perform(machine.child_subscribed(child.peer_id, self.sw.loop.now))

    def unsubscribe(self, child: SimNode) -> None:
        if self.children.pop(child.peer_id, None) is not None and self.machine is not None:
            self.perform(self.machine.child_left(child.peer_id, self.sw.loop.now))

    def depart(self, crash: bool) -> None:
        """The peer leaves before it finishes (``crash``: its host dies, saying nothing)."""
        machine = self.machine
        if self.dead or machine is None or machine.done:
            return
        sw = self.sw
        now = sw.loop.now
        self.dead = True
        sw.departed += 1
        for flow in self.flows.values():
            sw.wasted += sw.net.cancel(flow)
        self.flows.clear()
        for parent in self.parents.values():
            parent.unsubscribe(self)
        self.parents.clear()
        if crash:
            # Its uploads stop where they are; its children's requests time out.
            for child in self.children.values():
                for fid, flow in list(child.flows.items()):
                    if flow.data.parent_id == self.peer_id:
                        sw.wasted += sw.net.cancel(flow)
                        del child.flows[fid]
            self.children.clear()
            sw.loop.after(sw.cfg.detect_after, self._noticed_dead)
            return
        # A graceful exit: its uploads end, its announcements close, the scheduler hears.
        for child in list(self.children.values()):
            if child.machine is None:
                continue
            for fid, flow in list(child.flows.items()):
                if flow.data.parent_id == self.peer_id:
                    sw.wasted += sw.net.cancel(flow)
                    del child.flows[fid]
                    child.perform(child.machine.piece_failed(fid, "parent left", now))
            child.perform(child.machine.parent_gone(self.peer_id, now))
        self.children.clear()
        sw.to_scheduler(self.host_id, LeaveHost(host_id=self.host_id))

    def _noticed_dead(self, _: object) -> None:
        """The scheduler's keepalive gives up on the dead host."""
        sw = self.sw
        sw._dispatch(sw.scheduler.host_disconnected(self.host_id, sw.loop.now))

    def _left(self) -> None:
        """The download failed: its announcements end, its children drop it."""
        now = self.sw.loop.now
        for child in list(self.children.values()):
            if child.machine is not None:
                child.perform(child.machine.parent_gone(self.peer_id, now))
        self.children.clear()

    # -- time --------------------------------------------------------------------------

    def _schedule_tick(self) -> None:
        machine = self.machine
        assert machine is not None
        now = self.sw.loop.now
        when = max(machine.next_wakeup(now), now)
        if when < self.wake_at:
            self.wake_at = when
            self.sw.loop.at(when, self._tick, when)

    def _tick(self, when: float) -> None:
        if when != self.wake_at or self.dead:
            return  # superseded by an earlier one
        machine = self.machine
        assert machine is not None
        self.wake_at = INF
        now = self.sw.loop.now
        if now != self.ticked_at:
            self.ticked_at, self.ticks_here = now, 0
        self.ticks_here += 1
        if self.ticks_here > _TICKS_AT_ONE_MOMENT:
            # A timer that never expires: virtual time would stand still for good.
            raise RuntimeError(
                f"{self.peer_id}: the download machine asks to be woken at t={now!r} "
                f"after each of {_TICKS_AT_ONE_MOMENT} ticks at that moment"
            )
        self.perform(machine.tick(now))
        self._end_schedule()

    def _end_schedule(self) -> None:
        """An ended download keeps its announcement schedule while it lingers; then,
        as the real daemon does, everything is announced."""
        machine = self.machine
        assert machine is not None
        if machine.done and not self.revealed_all and not machine.lingering(self.sw.loop.now):
            self.revealed_all = True
            self.perform(machine.reveal_all())


class Swarm:
    """The scheduler, the origin, the hosts and the event loop of one run."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.k = cfg.piece_count
        self.loop = EventLoop()
        self.net = make_network(self.loop, download_caps=cfg.peer_down is not None)
        self.scheduler = Scheduler(cfg.settings, seed=cfg.seed)
        self.rng = Random(cfg.seed)
        # The piece size goes in the task when it is one a task may name; else the
        # seed's TaskMetadata sets it (the scheduler takes the reporter's layout).
        explicit: int | None = cfg.piece_size
        try:
            check_piece_length(cfg.piece_size)
        except IdentityError:
            explicit = None
        self.spec = TaskSpec(url=URL, piece_length=explicit)
        self.task_id = self.spec.task_id
        self.machine_config = MachineConfig(
            concurrent_pieces=cfg.concurrent_pieces,
            per_parent_limit=cfg.per_parent_limit,
            piece_timeout=cfg.piece_timeout,
            origin_concurrency=cfg.origin_concurrency,
            reschedule_interval=cfg.reschedule_interval,
            report_interval=cfg.report_interval,
            reveal_after=cfg.reveal_after,
            give_up_after=cfg.give_up_after,
            linger_limit=cfg.linger_limit,
            stagger=cfg.stagger,
        )
        # Deterministic stand-ins for the origin's piece digests.
        self.digests = [hashlib.sha256(n.to_bytes(8, "big")).digest() for n in range(self.k)]
        self._last_len = cfg.size - (self.k - 1) * cfg.piece_size
        self.origin = Endpoint("origin", cfg.origin_up)
        self.nodes: dict[str, SimNode] = {}
        self.seeds: list[SimNode] = []
        self.peers: list[SimNode] = []
        self.finished = 0
        self.back_to_source = 0
        self.departed = 0
        self.origin_bytes = 0
        self.p2p_bytes = 0
        self.wasted = 0.0
        self.errors: list[str] = []  # Error answers from the scheduler
        self.failures: list[str] = []  # downloads that ended without the file
        self.last_progress = 0.0
        self.gave_up = ""  # why the run stopped before every peer finished
        for i in range(cfg.seed_peers):
            node = SimNode(self, f"seed-{i:03d}", seed=True)
            self.nodes[node.host_id] = node
            self.seeds.append(node)
        width = max(4, len(str(cfg.peers - 1)))
        for i in range(cfg.peers):
            node = SimNode(self, f"peer-{i:0{width}d}", seed=False)
            self.nodes[node.host_id] = node
            self.peers.append(node)

    def piece_len(self, number: int) -> int:
        return self.cfg.piece_size if number < self.k - 1 else self._last_len

    # -- message plumbing ------------------------------------------------------------

    def to_scheduler(self, host_id: str, msg: Message) -> None:
        self.loop.after(self.cfg.latency, self._scheduler_handle, (host_id, msg))

    def _scheduler_handle(self, arg: tuple[str, Message]) -> None:
        host_id, msg = arg
        self._dispatch(self.scheduler.handle(host_id, msg, self.loop.now))

    def _dispatch(self, sends: list[Decision]) -> None:
        after, latency, deliver = self.loop.after, self.cfg.latency, self._deliver
        for s in sends:
            after(latency, deliver, s)

    def _deliver(self, send: Decision) -> None:
        self.nodes[send.host_id].receive(send.message)

    def _tick(self, _: object) -> None:
        now = self.loop.now
        self._dispatch(self.scheduler.tick(now))
        if self.cfg.check_invariants:
            self.scheduler.check_invariants()
        if now - self.last_progress > self.cfg.stall_limit:
            self.gave_up = (
                f"no piece landed anywhere for {self.cfg.stall_limit:g} s "
                f"(since t={self.last_progress:.1f} s): the swarm is stuck"
            )
        elif self._ended() < len(self.peers):
            self.loop.after(self.cfg.settings.retry_interval, self._tick)

    # -- running ---------------------------------------------------------------------

    def run(self) -> SimResult:
        cfg = self.cfg
        wall = time.perf_counter()
        loop = self.loop
        for node in self.seeds:
            self.scheduler.host_connected(node.info, 0.0)
        t_min = cfg.bound()
        t = 0.0
        for node in self.peers:
            loop.at(t, node.arrive)
            fate = self.rng.random()
            if fate < cfg.departures + cfg.crashes:
                crash = fate >= cfg.departures
                loop.at(t + self.rng.uniform(0.0, t_min), node.depart, crash)
            if cfg.arrival == "poisson":
                t += self.rng.expovariate(cfg.arrival_rate)
        loop.at(0.0, self._tick)
        limit = cfg.max_time if cfg.max_time is not None else t + 20 * t_min + 600.0
        n = len(self.peers)
        failures = self.failures
        loop.run(limit, lambda: self._ended() >= n or bool(self.gave_up))
        if failures and not self.gave_up:
            self.gave_up = f"{len(failures)} peers failed, the first: {failures[0]}"
        if self.finished + self.departed < n and not self.gave_up:
            self.gave_up = f"gave up at t={loop.now:.1f} s (max time {limit:g} s)"
        return self._result(t_min, time.perf_counter() - wall)

    def _ended(self) -> int:
        """Peers that finished, failed, or left before finishing."""
        return self.finished + len(self.failures) + self.departed

    def _result(self, t_min: float, wall: float) -> SimResult:
        cfg = self.cfg
        done = [p for p in self.peers if p.done]
        stayed = [p for p in self.peers if not p.dead]
        t_all = max(p.finished_at for p in done) if len(done) == len(stayed) else INF
        machines = [n.machine for n in self.nodes.values() if n.machine is not None]
        triggered = [s for s in self.seeds if s.registered]
        complete = all(p.count == self.k for p in stayed) and all(
            s.count == self.k for s in triggered
        )
        return SimResult(
            config=cfg,
            piece_count=self.k,
            t_min=t_min,
            t_all=t_all,
            efficiency=t_min / t_all if t_all > 0 else 1.0,
            piece_factor=piece_factor(cfg.peers, self.k),
            finished=len(done),
            complete=complete,
            origin_bytes=self.origin_bytes,
            seed_origin_bytes=sum(s.origin_bytes for s in self.seeds),
            p2p_bytes=self.p2p_bytes,
            wasted_bytes=round(self.wasted),
            back_to_source_peers=self.back_to_source,
            reschedules=sum(m.counters.reschedules for m in machines),
            timeouts=sum(m.counters.timeouts for m in machines),
            errors=len(self.errors),
            failed=sum(1 for p in self.peers if p.failed),
            departed=self.departed,
            gave_up=self.gave_up,
            durations=tuple(sorted(p.finished_at - p.arrived for p in done)),
            sim_time=self.loop.now,
            events=self.loop.events,
            counters=self.scheduler.counters.as_dict(),
            wall_time=wall,
        )


def run_simulation(cfg: SimConfig) -> SimResult:
    """Build the swarm for ``cfg`` and run it to the end (or to ``max_time``)."""
    return Swarm(cfg).run()
