"""Drives reapvm with Firecracker's Python client from PyPI (firecracker-python), as a
Firecracker user would: only the client's own `firecracker.api.Api`, unmodified. Run by
tests/clients.rs, one step per call:

  configure SOCKET SPEC   configure a VM with vsock, MMDS (V2) and a drive rate limiter
                          from SPEC (JSON) and start it
  snapshot SOCKET VMSTATE MEM
                          pause the VM and take a Full snapshot
  load SOCKET VMSTATE MEM METADATA TAP
                          load the snapshot into a fresh reapvm (its interface on
                          TAP), resume it, and put METADATA (JSON) in its MMDS

Each step prints the VM's configuration (`GET /vm/config` through the client) as JSON.
The client's higher-level MicroVM class is not used: it builds root filesystems with Docker
and sets up NAT on the host, which the tests' network rules forbid.
"""

import json
import sys

from firecracker.api import Api


def configure(api, spec):
    api.logger.put(level="Info", log_path=spec["log_path"])
    api.machine_config.put(vcpu_count=1, mem_size_mib=spec["mem_mib"])
    api.boot.put(kernel_image_path=spec["kernel"], boot_args=spec["boot_args"])
    api.drive.put(
        drive_id="rootfs",
        path_on_host=spec["rootfs"],
        is_root_device=True,
        is_read_only=True,
        rate_limiter={
            "bandwidth": {"size": 64 << 20, "refill_time": 100},
            "ops": {"size": 20000, "refill_time": 100},
        },
    )
    api.network.put(
        iface_id="eth0", host_dev_name=spec["tap"], guest_mac=spec["guest_mac"]
    )
    # As the client's MicroVM class configures MMDS (with the address given).
    api.mmds_config.put(
        version="V2", network_interfaces=["eth0"], ipv4_address="169.254.169.254"
    )
    api.mmds.put(**spec["metadata"])
    api.vsock.put(guest_cid=3, uds_path=spec["uds_path"])
    api.actions.put(action_type="InstanceStart")


def snapshot(api, vmstate, mem):
    api.vm.patch(state="Paused")
    api.create_snapshot.put(
        snapshot_type="Full", snapshot_path=vmstate, mem_file_path=mem
    )


def load(api, vmstate, mem, metadata, tap):
    # The fields the client's MicroVM class sends on a load.
    api.load_snapshot.put(
        enable_diff_snapshots=True,
        mem_backend={"backend_type": "File", "backend_path": mem},
        snapshot_path=vmstate,
        resume_vm=True,
        network_overrides=[{"iface_id": "eth0", "host_dev_name": tap}],
    )
    api.mmds.put(**metadata)


def main():
    step, socket = sys.argv[1], sys.argv[2]
    api = Api(socket)
    try:
        if step == "configure":
            with open(sys.argv[3]) as f:
                configure(api, json.load(f))
        elif step == "snapshot":
            snapshot(api, sys.argv[3], sys.argv[4])
        elif step == "load":
            load(api, sys.argv[3], sys.argv[4], json.loads(sys.argv[5]), sys.argv[6])
        else:
            raise SystemExit(f"unknown step {step!r}")
        print(json.dumps(api.vm_config.get().json()))
    finally:
        api.close()


if __name__ == "__main__":
    main()
