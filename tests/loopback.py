"""python tests/loopback.py COMMAND...: run COMMAND in a network namespace of its own whose only
interface is loopback, so that every server it starts (Ray's listen on all interfaces) is reachable
from this machine only. Needs the right to unshare the network namespace (root, or a user namespace);
where that is refused, COMMAND runs as it is with BN_LOOPBACK_UNAVAILABLE saying why, and the tests
that start servers skip with that reason."""

import ctypes
import fcntl
import os
import socket
import struct
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


if __name__ == "__main__":
    env = dict(os.environ)
    reason = isolate()
    if reason:
        env["BN_LOOPBACK_UNAVAILABLE"] = reason
    os.execvpe(sys.argv[1], sys.argv[1:], env)
