"""Spot reclaim: EC2 takes a spot instance back (it needs the capacity, or the price rose above the
maximum). ``twin.reclaim(instance_id)`` does what EC2 does at the end of the two-minute notice: the
machine stops at once (no clean shutdown: the hypervisor takes it), the instance is terminated with
StateReason ``Server.SpotInstanceTermination``, its disk and the volumes that end with it are gone.

``reclaim_after(twin, seconds)`` (``python -m twin --reclaim-spot-after S``) reclaims every spot
instance ``seconds`` after it was launched, for a demo or a test that cannot call the twin.
"""

from __future__ import annotations

import threading

from moto.ec2.models.instances import StateReason

from . import hooks
from .machine import TwinError

SPOT_REASON = StateReason("Server.SpotInstanceTermination: Spot instance termination",
                          "Server.SpotInstanceTermination")


def reclaim(twin, instance_id: str) -> None:
    """Reclaim the spot instance ``instance_id`` (TwinError for an on-demand one: EC2 never reclaims those)."""
    with twin._lock:
        instance = twin._instances.get(instance_id)
        if instance is None:
            raise TwinError(f"{instance_id}: no such instance in the twin")
        if instance.lifecycle != "spot":
            raise TwinError(f"{instance_id} is an on-demand instance; EC2 reclaims only spot instances")
        if instance.state in ("shutting-down", "terminated"):
            return
        machine = twin.machines[instance_id]
        hooks.ORIGINAL["terminate"](instance)  # moto's bookkeeping: interfaces and volumes that end with it
        instance.state_reason = SPOT_REASON
        instance._reason = SPOT_REASON.message
        if machine.running:
            machine.want = "terminate"
            # Terminated once the machine has really ended (the twin's exit handler, as for any termination).
            instance._state.name, instance._state.code = "shutting-down", 32
            machine.kill()
        else:
            machine.destroy_disk()


def reclaim_after(twin, seconds: float) -> None:
    """From now on, reclaim every spot instance ``seconds`` after it is created."""
    created = twin.created

    def timed(instance) -> None:
        created(instance)
        timer = threading.Timer(seconds, _quietly, args=(twin, instance))
        timer.daemon = True
        timer.start()

    twin.created = timed


def _quietly(twin, instance) -> None:
    # The lifecycle is set after the instance is created, so it is read when the timer fires.
    if instance.lifecycle == "spot" and not twin._closing:
        reclaim(twin, instance.id)
