//! The header rewrites a router makes, byte for byte as the XDP program makes them
//! (`flag::ROUTE`), and the address classes a router refuses.

use std::net::Ipv4Addr;

/// An address no router forwards from or to: this network, loopback, link-local, multicast,
/// reserved and broadcast (the fast path checks the same list on the source; destinations are
/// checked by the slow path, which installs no entry for them).
pub fn martian(a: Ipv4Addr) -> bool {
    let a = u32::from(a);
    let top = a >> 24;
    top == 0 || top == 127 || top >= 224 || a >> 16 == 0xa9fe
}

/// Sets the Ethernet addresses of `frame`.
pub fn set_eth(frame: &mut [u8], src: [u8; 6], dst: [u8; 6]) {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
}

/// TTL - 1 in the IPv4 header `ip` with the checksum updated incrementally (RFC 1624, as
/// Linux's `ip_decrease_ttl`): the TTL/protocol word drops by 0x0100, so the checksum grows by
/// 0x0100 with end-around carry. The caller checked TTL > 1.
pub fn dec_ttl(ip: &mut [u8]) {
    ip[8] -= 1;
    let c = u32::from(u16::from_be_bytes([ip[10], ip[11]])) + 0x0100;
    let c = c + u32::from(c >= 0xffff);
    ip[10..12].copy_from_slice(&(c as u16).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{IpNumber, Ipv4Header};

    #[test]
    fn incremental_ttl_matches_a_full_checksum() {
        for ttl in 2..=255u8 {
            for seed in [0u8, 1, 0x7f, 0xfe, 0xff] {
                let mut h = Ipv4Header::new(
                    100 + u16::from(seed),
                    ttl,
                    IpNumber::UDP,
                    [10, seed, 0, 1],
                    [10, 1, seed, 2],
                )
                .unwrap();
                h.identification = u16::from(seed) * 257;
                h.header_checksum = h.calc_header_checksum();
                let mut b = h.to_bytes();
                dec_ttl(&mut b);
                let (back, _) = Ipv4Header::from_slice(&b).unwrap();
                assert_eq!(back.time_to_live, ttl - 1);
                assert_eq!(
                    back.header_checksum,
                    back.calc_header_checksum(),
                    "ttl {ttl}"
                );
            }
        }
    }

    #[test]
    fn martians() {
        for a in [
            "0.1.2.3",
            "127.0.0.1",
            "169.254.1.1",
            "224.0.0.5",
            "255.255.255.255",
        ] {
            assert!(martian(a.parse().unwrap()), "{a}");
        }
        for a in ["10.0.0.1", "172.24.4.1", "192.0.2.1", "223.255.255.254"] {
            assert!(!martian(a.parse().unwrap()), "{a}");
        }
    }
}
