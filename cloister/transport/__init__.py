"""Getting commands and files to the hosts: Fabric connections and groups, the guarded remote runner, rsync, broadcast, put/get."""
