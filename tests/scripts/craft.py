#!/usr/bin/python3
"""Everything a VM can craft to reach another tenant (built by scapy): unicast to the other
tenant's MACs, broadcast and multicast, ARP for its addresses, its router's MAC, 802.1Q-tagged
frames, Geneve and VXLAN aimed at every chassis' underlay address, forged sources, IPv6,
unknown ethertypes, and random bytes. Each is sent `--count` times."""
import argparse
import os
import random

from scapy.all import ARP, Dot1Q, Ether, IP, IPv6, UDP, Raw, sendp
from scapy.contrib.geneve import GENEVE, GeneveOptions


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--iface", required=True)
    a.add_argument("--mac", required=True)
    a.add_argument("--ip", required=True)
    a.add_argument("--victim-macs", required=True, help="comma-separated")
    a.add_argument("--victim-ips", required=True, help="comma-separated")
    a.add_argument("--underlay", required=True, help="comma-separated chassis addresses")
    a.add_argument("--victim-vnis", required=True, help="comma-separated")
    a.add_argument("--count", type=int, default=3)
    o = a.parse_args()
    macs = o.victim_macs.split(",")
    ips = o.victim_ips.split(",")
    vnis = [int(v) for v in o.victim_vnis.split(",")]
    payload = Raw(b"tenant-crossing" + b"x" * 32)
    f = []
    for m in macs + ["ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01", "33:33:00:00:00:01"]:
        for ip in ips + ["255.255.255.255", "10.1.0.255"]:
            f.append(Ether(src=o.mac, dst=m) / IP(src=o.ip, dst=ip) / UDP(dport=9) / payload)
            f.append(Ether(src=o.mac, dst=m) / Dot1Q(vlan=1) / IP(src=o.ip, dst=ip) / UDP(dport=9)
                     / payload)
            # Forged source: the victim's own MAC and address.
            f.append(Ether(src=macs[0], dst=m) / IP(src=ips[0], dst=ip) / UDP(dport=9) / payload)
        f.append(Ether(src=o.mac, dst=m) / IPv6(dst="ff02::1") / UDP(dport=9) / payload)
        f.append(Ether(src=o.mac, dst=m, type=0x88cc) / payload)
    for ip in ips:
        f.append(Ether(src=o.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=o.mac, psrc=o.ip, pdst=ip))
        f.append(Ether(src=o.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=2, hwsrc=o.mac, psrc=ip, pdst=ip))
    # Tunnels aimed at the underlay, to the gateway's MAC and to everyone.
    for u in o.underlay.split(","):
        for vni in vnis:
            for egress in [1, 2, 3, 4, 5, 6, 32768]:
                ovn = GeneveOptions(classid=0x0102, type=0x80, data=(egress).to_bytes(4, "big"))
                inner = Ether(src=o.mac, dst=macs[0]) / IP(src=o.ip, dst=ips[0]) / UDP(dport=9) / payload
                for m in macs + ["ff:ff:ff:ff:ff:ff"]:
                    f.append(Ether(src=o.mac, dst=m) / IP(src=o.ip, dst=u) / UDP(dport=6081)
                             / GENEVE(critical=1, proto=0x6558, vni=vni, optionlen=2, options=[ovn])
                             / inner)
                    f.append(Ether(src=o.mac, dst=m) / IP(src=o.ip, dst=u) / UDP(dport=4789)
                             / Raw(b"\x08\x00\x00\x00" + vni.to_bytes(3, "big") + b"\x00")
                             / inner)
    rnd = random.Random(7)
    for _ in range(200):
        b = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(14, 300)))
        f.append(Ether(b))
    sendp(f * o.count, iface=o.iface, verbose=False)
    print(len(f) * o.count)


if __name__ == "__main__":
    main()
