"""Resize and repair of an EC2 cluster against a moto EC2 server over HTTP (no SSH: --no-wait).

What moto lacks (spot capacity refusals) is injected with botocore ``before-send`` handlers, as in
test_ec2.py; the EC2 twin tests (test_ec2_twin_resize.py) do the same with booting instances and SSH.
"""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

import pytest

import moto_server as ms  # before anything imports moto
from cloister.cluster import lifecycle as lib
from cloister.cluster import resize
from cloister.cluster.servers import read_servers
from cloister.errors import CloisterError, ProviderError
from cloister.providers.ec2.instances import encode_numbers, parse_ranges, ranges
from test_ec2 import arrange, aws, instances, key_file, live, make_cfg, moto, settings  # noqa: F401 - fixtures


def tags(instance: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def test_worker_number_ranges():
    assert ranges([3, 4, 5, 8]) == "3-5,8" and parse_ranges("3-5,8") == [3, 4, 5, 8]
    assert ranges([2]) == "2" and parse_ranges("2") == [2]
    batches = encode_numbers(list(range(1, 400, 2)))
    assert sum(len(b) for b in batches) == 200 and all(len(ranges(b)) <= 256 for b in batches)
    assert encode_numbers(list(range(1, 1000))) == [list(range(1, 1000))]


def grow(cfg, settings, inject, count: int) -> dict[str, int]:
    before = len(inject.calls)
    resize.resize(cfg, settings=settings, nworkers=count, wait=False)
    calls: dict[str, int] = {}
    for action, _ in inject.calls[before:]:
        calls[action] = calls.get(action, 0) + 1
    return calls


def test_grow_launches_workers_as_the_cluster_with_its_expiry_in_flat_requests(aws, make_cfg, settings):
    client, inject = aws
    cfg = make_cfg(nworkers=2, placement_group="pg-t1")
    store: dict = {}
    inject.on("before-send.ec2", ms.placement_groups_handler(store))
    info = lib.launch(cfg, settings=settings, wait=False).info
    # The cluster's expiry moved (as cluster.extend does): new workers get that one, not a fresh TTL.
    expires = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(hours=5)
    client.create_tags(Resources=[n.id for n in info.nodes],
                       Tags=[{"Key": "cloister:ttl-expires", "Value": f"{expires:%Y-%m-%dT%H:%M:%SZ}"}])
    plan = resize.resize(cfg, settings=settings, nworkers=5, dry_run=True)
    assert plan.lines[0] == "ec2 cluster 't1': 2 -> 5 workers: start worker-3, worker-4, worker-5 as the others " \
                            "(type, image, network, tags, key, the cluster's expiry)"
    assert plan.lines[1].startswith("cost change: +$0.29/hour for the workers ($0.19 -> $0.48/hour"), plan.lines
    assert len(live(client, "t1")) == 3

    few = grow(cfg, settings, inject, 5)
    after = read_servers(settings.servers_dir)
    assert [w.name for w in after.workers] == [f"t1-worker-{i}" for i in range(1, 6)]
    assert after.workers[:2] == info.workers
    found = {i["InstanceId"]: i for i in live(client, "t1")}
    master = found[info.master.id]
    for node in after.workers[2:]:
        new = found[node.id]
        assert tags(new)["cloister:ttl-expires"] == f"{expires:%Y-%m-%dT%H:%M:%SZ}"
        assert (tags(new)["cloister:role"], tags(new)["cloister:workers"], tags(new)["cloister:owner"]) == \
            ("worker", "3-5", tags(master)["cloister:owner"])
        assert (new["SubnetId"], new["ImageId"], new["KeyName"], new["InstanceType"]) == \
            (master["SubnetId"], master["ImageId"], master["KeyName"], "m5.large")
        assert {g["GroupId"] for g in new["SecurityGroups"]} == {g["GroupId"] for g in master["SecurityGroups"]}
        assert new["Placement"]["AvailabilityZone"] == master["Placement"]["AvailabilityZone"]
        data = client.describe_instance_attribute(InstanceId=node.id, Attribute="userData")["UserData"]["Value"]
        text = base64.b64decode(data).decode()
        assert f"TTL ({expires:%Y-%m-%dT%H:%M:%SZ})" in text and f'$INSTANCE_ID {int(expires.timestamp())}"' in text
    assert few["RunInstances"] == 1
    (run,) = [p for action, p in inject.calls if action == "RunInstances" and p.get("MinCount") == "3"]
    assert run["Placement.GroupName"] == "pg-t1" and run["ClientToken"].startswith("t1-w-")

    many = grow(cfg, settings, inject, 25)
    assert many == few, (few, many)  # the same requests for 20 new workers as for 3
    assert [w.name for w in read_servers(settings.servers_dir).workers] == [f"t1-worker-{i}" for i in range(1, 26)]
    # A launch finds the resized cluster whole; one asking for another size is told how to get it.
    again = lib.launch(cfg, settings=settings, nworkers=25, wait=False)
    assert not again.created and len(again.info.workers) == 25
    with pytest.raises(ProviderError, match="inv cluster.resize --nworkers 2 changes its size"):
        lib.launch(cfg, settings=settings, wait=False)


def test_repair_replaces_a_terminated_worker_under_its_number_and_place(aws, make_cfg, settings):
    client, inject = aws
    cfg = make_cfg(nworkers=3)
    info = lib.launch(cfg, settings=settings, wait=False).info
    listed = open(f"{settings.servers_dir}/servers.txt").read()
    client.terminate_instances(InstanceIds=[info.workers[1].id])
    (gone,) = resize.gone_nodes(cfg, settings=settings)
    assert gone.node == info.workers[1]
    assert gone.reason.startswith("terminated (Client.UserInitiatedShutdown): someone terminated it"), gone
    with pytest.raises(CloisterError, match=r"t1-worker-2 \(i-\w+, [\w.-]+\): terminated \(Client.User.*; run inv "
                                            r"cluster.repair first"):
        resize.resize(cfg, settings=settings, nworkers=4, wait=False)
    change = resize.repair(cfg, settings=settings, wait=False)
    after = read_servers(settings.servers_dir)
    assert [w.name for w in after.workers] == ["t1-worker-1", "t1-worker-2", "t1-worker-3"]
    assert after.workers[0] == info.workers[0] and after.workers[2] == info.workers[2]
    assert after.workers[1].id != info.workers[1].id and change.added == [after.workers[1]]
    assert open(f"{settings.servers_dir}/servers.txt").read() != listed  # a new address, at the same line
    assert open(f"{settings.servers_dir}/servers.txt").read().splitlines()[0] == listed.splitlines()[0]
    assert resize.gone_nodes(cfg, settings=settings) == []
    assert "nothing to repair" in resize.repair(cfg, settings=settings, wait=False).lines[0]


def test_spot_refused_fails_or_falls_back_on_demand(aws, make_cfg, settings):
    client, inject = aws
    cfg = make_cfg(nworkers=2, spot=True)
    info = lib.launch(cfg, settings=settings, wait=False).info
    client.terminate_instances(InstanceIds=[info.workers[0].id])

    def no_spot(request, **_):
        if "InstanceMarketOptions.MarketType" in ms.params(request):
            return ms.error_response(request, "InsufficientInstanceCapacity",
                                     "There is no Spot capacity available that matches your request.")
        return None

    inject.on("before-send.ec2.RunInstances", no_spot)
    with pytest.raises(ProviderError, match=r"EC2 refused spot capacity for worker-1 \(InsufficientInstanceCapacity\); "
                                            r"inv cluster.repair --spot-fallback replaces them on demand"):
        resize.repair(cfg, settings=settings, wait=False)
    assert len(live(client, "t1")) == 2
    change = resize.repair(cfg, settings=settings, spot_fallback=True, wait=False)
    (new,) = change.added
    found = {i["InstanceId"]: i for i in live(client, "t1")}
    assert new.name == "t1-worker-1" and found[new.id].get("InstanceLifecycle") != "spot"
    assert found[info.workers[1].id].get("InstanceLifecycle") == "spot"
    assert [w.name for w in read_servers(settings.servers_dir).workers] == ["t1-worker-1", "t1-worker-2"]
