#!/usr/bin/python3
"""Sends, from a VM, DHCP that a responder must survive (built by scapy, independent of geneflow).

kind: truncated (cut inside the fixed BOOTP header) | hlen (hardware length 7) | overflow (an
option whose length runs past the end of the packet) | server (an OFFER from the VM, UDP 67 -> 68,
as a rogue server would send) | discover (well-formed DISCOVERs: a flood with --count).
"""
import argparse

from scapy.all import BOOTP, DHCP, Ether, IP, UDP, Raw, mac2str, sendp


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--iface", required=True)
    a.add_argument("--mac", required=True)
    a.add_argument("--kind", required=True)
    a.add_argument("--count", type=int, default=1)
    o = a.parse_args()
    l2 = Ether(src=o.mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
    chaddr = mac2str(o.mac)
    frames = []
    for i in range(o.count):
        bootp = BOOTP(op=1, chaddr=chaddr, xid=0x1000 + i)
        if o.kind == "truncated":
            f = l2 / UDP(sport=68, dport=67) / Raw(bytes(bootp)[:100])
        elif o.kind == "hlen":
            f = l2 / UDP(sport=68, dport=67) / BOOTP(op=1, hlen=7, chaddr=chaddr, xid=i) / DHCP(
                options=[("message-type", "discover"), "end"])
        elif o.kind == "overflow":
            # Magic cookie, then message type with a length of 200 and 3 bytes of data.
            raw = bytes(BOOTP(op=1, chaddr=chaddr, xid=i, options=b""))[:236]
            f = l2 / UDP(sport=68, dport=67) / Raw(raw + b"\x63\x82\x53\x63" + b"\x35\xc8\x01\x02\x03")
        elif o.kind == "server":
            f = Ether(src=o.mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="10.0.0.1", dst="255.255.255.255") / \
                UDP(sport=67, dport=68) / BOOTP(op=2, yiaddr="10.0.0.77", chaddr=chaddr, xid=i) / \
                DHCP(options=[("message-type", "offer"), ("server_id", "10.0.0.1"), "end"])
        elif o.kind == "discover":
            f = l2 / UDP(sport=68, dport=67) / bootp / DHCP(
                options=[("message-type", "discover"), "end"])
        else:
            raise SystemExit("unknown kind " + o.kind)
        frames.append(f)
    sendp(frames, iface=o.iface, verbose=False)


if __name__ == "__main__":
    main()
