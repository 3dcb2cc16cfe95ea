"""python tests/loopback.py COMMAND...: run COMMAND in a network namespace of its own whose only
interface is loopback, so that every server it starts (Ray's listen on all interfaces) is reachable
from this machine only. Needs the right to unshare the network namespace (root, or a user namespace);
where that is refused, COMMAND runs as it is with BN_LOOPBACK_UNAVAILABLE saying why, and the tests
that start servers skip with that reason. `two_hosts` makes two namespaces joined only to each other,
for a test of two machines (tests/test_two_nodes.py)."""

import contextlib
import ctypes
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def isolate() -> str | None:
    """Move this process into a new network namespace with loopback up; the reason if it cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        return f"unshare(CLONE_NEWNET) was refused: {os.strerror(ctypes.get_errno())}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH", b"lo", 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))
    return None


def loopback_only() -> bool:
    """True when the only network interface here is loopback."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


@contextlib.contextmanager
def two_hosts(tag: str):
    """Two network namespaces joined by a veth pair and nothing else (no route out of this machine), for a test
    of what crosses a network between two machines: yields [(namespace, interface, address), ...] for hosts a
    and b, and deletes both at the end. Needs root and iproute2's `ip`; where either is missing or the kernel
    refuses, raises OSError saying why (the test skips with it)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        raise OSError("two network namespaces need root and iproute2's `ip` (apt-get install iproute2)")
    octet = os.getpid() % 200 + 20
    hosts = [
        (f"{tag}{os.getpid()}{side}", f"{tag}{os.getpid()}{side}", f"10.213.{octet}.{n}")
        for n, side in ((1, "a"), (2, "b"))
    ]
    (a_ns, a_if, _), (b_ns, b_if, _) = hosts
    steps = [
        ["netns", "add", a_ns],
        ["netns", "add", b_ns],
        ["link", "add", a_if, "type", "veth", "peer", "name", b_if],
        ["link", "set", a_if, "netns", a_ns],
        ["link", "set", b_if, "netns", b_ns],
    ]
    for ns, interface, address in hosts:
        steps += [
            ["-n", ns, "addr", "add", f"{address}/24", "dev", interface],
            ["-n", ns, "link", "set", "lo", "up"],
            ["-n", ns, "link", "set", interface, "up"],
        ]
    try:
        for step in steps:
            done = subprocess.run(["ip", *step], capture_output=True, text=True, timeout=30)
            if done.returncode:
                raise OSError(f"`ip {' '.join(step)}` failed: {done.stderr.strip()}")
        yield hosts
    finally:  # deleting a namespace deletes its end of the pair, and with it the other end
        for ns, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


if __name__ == "__main__":
    env = dict(os.environ)
    reason = isolate()
    if reason:
        env["BN_LOOPBACK_UNAVAILABLE"] = reason
    os.execvpe(sys.argv[1], sys.argv[1:], env)
