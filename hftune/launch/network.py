"""Several machines: the socket interface gloo and NCCL connect through, set before the process group
starts. Each process advertises the address of its host name unless GLOO_SOCKET_IFNAME /
NCCL_SOCKET_IFNAME name an interface; where the host name resolves to 127.0.0.1 (many containers),
the other machines dial their own loopback and the run dies in gloo's connectFullMesh while node 0
waits. hftune pins both to the interface that reaches main_process_ip (MASTER_ADDR), unless set.

Example:
    >>> pin_socket_interface({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "10.0.0.1"})  # doctest: +SKIP
    'eth0'
"""

import ipaddress
import os
import re
import socket
import sys

from hftune.errors import HftuneError

SOCKET_IFNAMES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def route_interface(address):
    """The name of this host's interface whose route reaches `address` (an IPv4 address)."""
    import psutil

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((address, 9))  # a UDP connect sends nothing: the kernel only picks the route
        except OSError as err:
            raise HftuneError(f"main_process_ip {address} cannot be reached from this machine ({err.strerror}); "
                              "give node 0's address on a network every node shares.") from None
        local = probe.getsockname()[0]
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addresses):
            return name
    raise HftuneError(f"no interface holds {local}, the address that reaches main_process_ip {address}; set "
                      "GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) to the interface to use.")


def pin_socket_interface(environ=os.environ):
    """Set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (where unset) for a run spanning machines; returns
    the interface, or None for a one-machine run or where the user set both."""
    world = int(environ.get("WORLD_SIZE", 1))
    if world <= int(environ.get("LOCAL_WORLD_SIZE", world)) or all(k in environ for k in SOCKET_IFNAMES):
        return None
    master = environ.get("MASTER_ADDR", "")
    try:
        address = socket.gethostbyname(master)
    except OSError:
        raise HftuneError(f"main_process_ip '{master}' does not resolve; give node 0's IP address.") from None
    if ipaddress.ip_address(address).is_loopback:
        raise HftuneError(f"main_process_ip '{master}' is this machine's loopback, which other machines cannot reach; "
                          "give node 0's address on the network the nodes share.")
    interface = route_interface(address)
    for key in SOCKET_IFNAMES:
        environ.setdefault(key, interface)
    if environ.get("LOCAL_RANK", "0") == "0":  # (logging is set up later, once the config is read)
        print(f"hftune: {world} processes on several machines: sockets on {interface}, the interface that reaches "
              f"main_process_ip {address} ({' / '.join(SOCKET_IFNAMES)} choose another)", file=sys.stderr)
    return interface


# what gloo and NCCL say when a peer process is gone (killed, crashed, its machine down)
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def lost_peer_line(err):
    """One line for an error that means another process of the run is gone; None for any other error."""
    text = str(err)
    if not any(sign in text for sign in LOST_PEER):
        return None
    peer = re.search(r"\[([0-9a-fA-F.:]+)\]:\d+", text)
    where = f" ({peer.group(1)})" if peer else ""
    return (f"another process of the run stopped{where}: its machine or process died (see that node's log). "
            "Rerun every node's command with resume_from_checkpoint: auto to continue from the last complete "
            "checkpoint.")


def check_main_process(ip, port, machine_rank, timeout):
    """Before a multi-node launch (hftune launch): node 0 must own main_process_ip; another node waits at
    most `timeout` seconds for node 0's port to open instead of a rendezvous that can wait for many minutes."""
    import time

    import psutil

    if machine_rank == 0:
        mine = {a.address for addresses in psutil.net_if_addrs().values() for a in addresses
                if a.family == socket.AF_INET}
        if socket.gethostbyname(ip) not in mine:
            raise HftuneError(f"machine_rank 0 runs the main process, but main_process_ip {ip} is not an address of "
                              f"this machine ({', '.join(sorted(mine))}); give node 0's own address, or this node its "
                              "own machine_rank.")
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((ip, port), timeout=min(5.0, timeout)).close()
            return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise HftuneError(f"node 0 at main_process_ip {ip}, port {port}, did not answer within {timeout:.0f} s "
                                  f"({err.strerror or err}): start machine_rank 0, check the address and that the "
                                  "port is open between the machines (HFTUNE_PREFLIGHT_TIMEOUT sets the wait).") from None
            time.sleep(1.0)
