#!/usr/bin/python3
"""Injects Geneve frames built by scapy (an encoder independent of geneflow) into the underlay.

kind: good | critical (unknown critical option) | version1 | optlen (option length past the end
of the options area) | truncated (Geneve header cut short) | udplong / udpshort (a good frame
whose outer UDP length claims 8 bytes more / fewer than it carries). Every inner frame is a valid
UDP/IPv4 datagram carrying an 8-byte sequence number, so a receiver would count it if it leaked.
"""
import argparse
import struct

from scapy.all import Ether, IP, UDP, Raw, sendp
from scapy.contrib.geneve import GENEVE, GeneveOptions


def main():
    a = argparse.ArgumentParser()
    for f in ["iface", "dst_mac", "src_ip", "dst_ip", "inner_src_mac", "inner_dst_mac",
              "inner_src_ip", "inner_dst_ip"]:
        a.add_argument("--" + f.replace("_", "-"), required=True)
    a.add_argument("--vni", type=int, required=True)
    a.add_argument("--ingress", type=int, required=True)
    a.add_argument("--egress", type=int, required=True)
    a.add_argument("--dport", type=int, default=7000)
    a.add_argument("--count", type=int, default=1)
    a.add_argument("--kind", default="good")
    o = a.parse_args()

    ovn = GeneveOptions(classid=0x0102, type=0x80,
                        data=struct.pack("!I", ((o.ingress & 0x7FFF) << 16) | o.egress))
    frames = []
    for seq in range(o.count):
        inner = (Ether(src=o.inner_src_mac, dst=o.inner_dst_mac)
                 / IP(src=o.inner_src_ip, dst=o.inner_dst_ip, ttl=64)
                 / UDP(sport=40000, dport=o.dport) / Raw(struct.pack("!Q", seq) + b"x" * 24))
        if o.kind == "good":
            g = GENEVE(critical=1, proto=0x6558, vni=o.vni, optionlen=2, options=[ovn]) / inner
        elif o.kind == "critical":
            bad = GeneveOptions(classid=0xFFFF, type=0x81, data=b"\x00\x00\x00\x01")
            g = GENEVE(critical=1, proto=0x6558, vni=o.vni, optionlen=4, options=[bad, ovn]) / inner
        elif o.kind == "version1":
            g = GENEVE(version=1, critical=1, proto=0x6558, vni=o.vni, optionlen=2,
                       options=[ovn]) / inner
        elif o.kind == "optlen":
            past = GeneveOptions(classid=0x0102, type=0x80, length=3, data=bytes(ovn)[4:8])
            g = GENEVE(critical=1, proto=0x6558, vni=o.vni, optionlen=2, options=[past]) / inner
        elif o.kind in ("udplong", "udpshort"):
            pass
        elif o.kind == "truncated":
            g = Raw(bytes(GENEVE(critical=1, proto=0x6558, vni=o.vni, optionlen=2,
                                 options=[ovn]))[:6])
        else:
            raise SystemExit("unknown kind " + o.kind)
        if o.kind in ("udplong", "udpshort"):
            g = GENEVE(critical=1, proto=0x6558, vni=o.vni, optionlen=2, options=[ovn]) / inner
        f = (Ether(dst=o.dst_mac) / IP(src=o.src_ip, dst=o.dst_ip, flags="DF")
             / UDP(sport=50000 + seq % 1000, dport=6081) / g)
        if o.kind in ("udplong", "udpshort"):
            f[UDP].len = len(f[UDP]) + (8 if o.kind == "udplong" else -8)
        frames.append(f)
    sendp(frames, iface=o.iface, verbose=False)


if __name__ == "__main__":
    main()
