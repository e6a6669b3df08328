"""Which sender pushes to which node, and when: the scheduler behind a redeploy.

Flat: the dev instance is the only sender, ``concurrency`` hops at a time. Tree: the dev instance
seeds ``TREE_SEEDS`` nodes, then every node that has the code pushes to one more node at a time, so
the number of holders doubles each round and the dev instance sends at most ``TREE_SEEDS`` copies.
A node-to-node hop that fails is retried directly from the dev instance, so an error always names
the node that is really at fault.

The hop itself (one rsync) is the caller's; it must return a Transfer, never raise.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from ..cluster.servers import Node
from .transfer import OnResult, Transfer

TREE_SEEDS = 2

Source = str | Node                  # the dev instance (by host) or a node that has the code
Hop = Callable[[Source, Node, int], Transfer]
Job = tuple[Source, Node, int]       # sender, target, attempt


def schedule(dev: str, targets: list[Node], *, tree: bool, concurrency: int, hop: Hop,
             on_result: OnResult | None, seeds: int = TREE_SEEDS) -> tuple[dict[str, Transfer], list[Transfer]]:
    """Run hops until every target has the code or has failed from the dev instance.

    Returns each target's final Transfer by host, and every hop that ran (retries included).
    """
    plan = _Broadcast(dev, targets, tree=tree, concurrency=concurrency, seeds=seeds)
    pool = ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(targets))))
    try:
        while plan.unfinished:
            plan.start(pool, hop)
            done, _ = wait(list(plan.running), return_when=FIRST_COMPLETED)
            for future in done:
                final = plan.finish(future)
                if final and on_result:
                    on_result(final)
    except BaseException:
        # Ctrl-C: start nothing more; the caller closes the connections, which ends running rsyncs.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return plan.final, plan.hops


class _Broadcast:
    """The state of one broadcast: who waits, who holds the code, what runs."""

    def __init__(self, dev: str, targets: list[Node], *, tree: bool, concurrency: int, seeds: int):
        self.dev = dev
        self.tree = tree
        self.concurrency = concurrency
        self.seeds = seeds
        self.pending: deque[tuple[Node, int]] = deque((t, 1) for t in targets)
        self.retry: deque[tuple[Node, int]] = deque()     # node hops that failed: redo from the dev instance
        self.holders: deque[Node] = deque()                # nodes with the code and no hop running
        self.running: dict[Future, Job] = {}
        self.final: dict[str, Transfer] = {}
        self.hops: list[Transfer] = []
        self.dev_busy = 0
        self.dev_ok = 0

    @property
    def unfinished(self) -> bool:
        return bool(self.pending or self.retry or self.running)

    def next_job(self) -> Job | None:
        """The hop to start now, or None when it must wait for a running one to finish."""
        if self.retry:
            return (self.dev, *self.retry.popleft())
        if self.tree and self.holders:
            return (self.holders.popleft(), *self.pending.popleft())
        # Tree: past its seeds the dev instance sends only when nothing runs, so no holder is on its way.
        if not self.tree or self.dev_ok + self.dev_busy < self.seeds or not self.running:
            return (self.dev, *self.pending.popleft())
        return None

    def start(self, pool: ThreadPoolExecutor, hop: Hop) -> None:
        while len(self.running) < self.concurrency and (self.pending or self.retry):
            job = self.next_job()
            if job is None:
                break
            if job[0] == self.dev:
                self.dev_busy += 1
            self.running[pool.submit(hop, *job)] = job

    def finish(self, future: Future) -> Transfer | None:
        """Record a finished hop; return the target's final Transfer, or None when it is retried."""
        source, target, attempt = self.running.pop(future)
        outcome = future.result()
        self.hops.append(outcome)
        from_dev = source == self.dev
        if from_dev:
            self.dev_busy -= 1
        else:
            self.holders.append(source)
        if outcome.ok:
            if from_dev:
                self.dev_ok += 1
            if self.tree:
                self.holders.append(target)
        elif not from_dev:
            self.retry.append((target, attempt + 1))
            return None
        self.final[target.host] = outcome
        return outcome
