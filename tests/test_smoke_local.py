"""A first end-to-end check of the local cluster through `inv`."""


def test_run_on_every_host(local_cluster):
    proc = local_cluster.inv("cluster.run", "hostname")
    assert proc.returncode == 0, proc.stderr
    for node in local_cluster.info.cluster_nodes:
        assert node.name in proc.stdout
