#!/usr/bin/python3
"""Sends, from a VM, frames its port may not send (built by scapy, independent of geneflow).

kind: mac (forged Ethernet source) | ip (forged IPv4 source) | arp-sha (ARP whose sender MAC is
not the Ethernet source) | arp-spa (ARP reply claiming another VM's address: cache poisoning) |
ipv6 (from a port without IPv6 addresses) | good (the port's own addresses, as a control).
"""
import argparse

import struct

from scapy.all import ARP, Ether, IP, IPv6, UDP, Raw, sendp

FORGED_MAC = "0a:00:00:00:00:66"
FORGED_IP = "10.0.0.200"


def main():
    a = argparse.ArgumentParser()
    for f in ["iface", "mac", "ip", "victim_mac", "victim_ip", "kind"]:
        a.add_argument("--" + f.replace("_", "-"), required=True)
    a.add_argument("--dport", type=int, default=7777)
    a.add_argument("--count", type=int, default=1)
    o = a.parse_args()
    frames = [build(o, UDP(sport=40000, dport=o.dport) / Raw(struct.pack("!Q", i) + b"x" * 24))
              for i in range(o.count)]
    sendp(frames, iface=o.iface, verbose=False)


def build(o, udp):
    """One frame of o.kind; UDP ones carry `udp` (sequence-numbered, as gf-udp counts)."""
    if o.kind == "mac":
        f = Ether(src=FORGED_MAC, dst=o.victim_mac) / IP(src=o.ip, dst=o.victim_ip) / udp
    elif o.kind == "ip":
        f = Ether(src=o.mac, dst=o.victim_mac) / IP(src=FORGED_IP, dst=o.victim_ip) / udp
    elif o.kind == "arp-sha":
        f = Ether(src=o.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=FORGED_MAC, psrc=o.ip, pdst=o.victim_ip)
    elif o.kind == "arp-spa":
        # "victim_ip is at my MAC", to everyone.
        f = Ether(src=o.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=2, hwsrc=o.mac, psrc=o.victim_ip, hwdst="ff:ff:ff:ff:ff:ff", pdst=o.victim_ip)
    elif o.kind == "ipv6":
        f = Ether(src=o.mac, dst=o.victim_mac) / IPv6(src="fe80::66", dst="fe80::1") / udp
    elif o.kind == "good":
        f = Ether(src=o.mac, dst=o.victim_mac) / IP(src=o.ip, dst=o.victim_ip) / udp
    else:
        raise SystemExit("unknown kind " + o.kind)
    return f


if __name__ == "__main__":
    main()
