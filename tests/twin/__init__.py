"""An EC2 twin on this machine: moto for the API, and instances that really boot (issue 10).

Usage (as root, after ``scripts/twin-deps.sh``; ``tests/`` on ``sys.path``, as under pytest)::

    from twin import Twin

    with Twin() as twin:                     # moto EC2 on 127.0.0.1 in this process
        ec2 = twin.client()                  # boto3 client for twin.url (region moto_server.REGION)
        env = twin.env()                     # environment for an `inv` subprocess (AWS_ENDPOINT_URL_EC2...)
        ...RunInstances...
        machine = twin.machine(instance_id)  # .address, .addresses, .wait_ssh(s), .console(), .running
    # every machine, cgroup, address claim and file of the twin is gone here, also after an exception

What it reproduces of EC2
- The EC2 API is moto's (with AMI, instance type and key pair validation, as tests/moto_server.py).
- Each instance that RunInstances creates boots a machine: real systemd 252 (Debian's) as PID 1 of its
  own PID, mount, UTS, IPC and cgroup namespaces; its disk is an overlay over this machine's ``/``
  (writes stay in the instance, and survive stop/start); its own hostname (``ip-127-0-200-1``).
- Real cloud-init (Debian's) with the NoCloud datasource only: the user data exactly as RunInstances
  received it, meta-data with the instance id and the key pair's public key; the login user ``ubuntu``
  (passwordless sudo) is created by cloud-init with that key, as on Ubuntu AMIs. Per-boot parts of the
  user data run on every boot, per-instance parts once.
- OpenSSH's ssh.service with host keys cloud-init generates per instance, listening only on the
  instance's addresses.
- Addresses: private and public IP from a loopback pool (127.0.200-249.x, claimed beside cloister's
  local provider so neither uses the other's); DNS names are those addresses. A started instance gets
  a new public address, as on EC2; no instance ever carries an address outside 127.0.0.0/8.
- StopInstances / StartInstances power the machine off (stopping -> stopped) and boot it again (same
  id, same disk); TerminateInstances powers it off (shutting-down -> terminated) and deletes its disk.
  A machine that powers itself off (``poweroff`` inside, a TTL timer) becomes stopped or terminated
  according to its InstanceInitiatedShutdownBehavior.
- CreateImage records the instance's disk (its home, and every change it made), and instances
  launched from that AMI start from it (cloud-init then runs its per-instance parts for the new id).
- GetConsoleOutput returns the machine's real console (systemd's and cloud-init's output).
- EC2's daily failures on demand (``Twin(faults=Faults(...))``, ``CLOISTER_TWIN_FAULTS``, see faults.py):
  new ids unknown for a while, zones without capacity, vCPU quotas (Service Quotas answers them),
  refusals such as PendingVerification, throttling.

What it does not
- No hypervisor: the instances share this machine's kernel, its network namespace (services must bind
  to the instance's address, not 0.0.0.0) and its CPUs/memory; instance types change nothing.
- No instance metadata service (169.254.169.254) and no VPC DNS; no package mirrors (user data that
  installs packages uses this machine's apt sources); security groups do not filter anything.
- RebootInstances and a reboot from inside act as moto does / as a power-off; CreateImage does not
  reboot the instance first; EBS volumes, snapshots and Elastic IPs are moto's bookkeeping only.
- Root inside an instance is root on the machine's kernel (no user namespace). The twin drops
  CAP_SYS_BOOT and the capabilities that reach the shared kernel (modules, clock, network
  configuration, raw I/O, kernel log) from the bounding set, keeps /proc/sys and /sys read-only and
  gives each instance a private /dev and console; root inside still has CAP_SYS_ADMIN. That is for
  trusted test user data, not a security boundary. Never ``nsenter`` an instance to poke at it: the
  entered process keeps the machine's full capabilities; log in over SSH instead.
- One twin per process (moto's backends are global to it).
"""

from .machine import Machine, TwinError
from .twin import Twin

__all__ = ["Machine", "Twin", "TwinError"]
