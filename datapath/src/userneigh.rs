//! The underlay neighbour table of a datapath that owns its uplink (the DPDK backend: no
//! kernel stack sees the port, so nobody else answers ARP for the tunnel address or resolves
//! the other chassis). Sans-IO: frames in, frames out.
//!
//! - It answers ARP requests for this chassis's tunnel address, and learns the sender of any
//!   request or reply addressed to it (so a chassis that asks is known at once).
//! - It resolves other chassis on demand: a lookup that misses yields a request to send, at
//!   most one per address per `RETRY`, and the packet waits in the caller's pending queue or
//!   goes (the slow path's choice, as with the kernel's neighbour table).
//! - Only chassis addresses are learnt (`allowed`), so a host on the underlay cannot fill
//!   the table; entries older than `STALE` are asked again while still used.

use crate::pipeline::rewrite::arp_frame;
use geneflow_control::model::Mac;
use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetAddress};
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// An Ethernet frame carrying an IPv4-over-Ethernet ARP packet (14 + 28 bytes).
const ARP_FRAME_LEN: usize = 42;

/// How long before an unanswered request for the same address is sent again.
pub const RETRY: Duration = Duration::from_secs(1);
/// How old an entry may get before it is asked again (and still used meanwhile).
pub const STALE: Duration = Duration::from_secs(60);

pub struct UnderlayNeigh {
    ip: Ipv4Addr,
    mac: Mac,
    allowed: HashSet<Ipv4Addr>,
    table: HashMap<Ipv4Addr, ([u8; 6], Instant)>,
    asked: HashMap<Ipv4Addr, Instant>,
}

/// What a lookup found: the MAC if known (a stale one still serves), and a request to send
/// if the address is to be asked (none when one went out within `RETRY`).
#[derive(Debug, PartialEq, Eq)]
pub struct Resolve {
    pub mac: Option<[u8; 6]>,
    pub request: Option<Vec<u8>>,
}

impl UnderlayNeigh {
    pub fn new(ip: Ipv4Addr, mac: Mac) -> UnderlayNeigh {
        UnderlayNeigh {
            ip,
            mac,
            allowed: HashSet::new(),
            table: HashMap::new(),
            asked: HashMap::new(),
        }
    }

    /// The tunnel address it answers for.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The chassis addresses (from the NB); entries of others are forgotten.
    pub fn set_allowed(&mut self, peers: impl IntoIterator<Item = Ipv4Addr>) {
        self.allowed = peers.into_iter().collect();
        let allowed = &self.allowed;
        self.table.retain(|ip, _| allowed.contains(ip));
        self.asked.retain(|ip, _| allowed.contains(ip));
    }

    /// An ARP frame from the uplink: learns its sender if it is a chassis talking to us, and
    /// returns the reply to send if it asks for our address (built on the stack: an
    /// underlay host may send these as fast as it likes). Anything else: `None`.
    pub fn on_arp(&mut self, frame: &[u8], now: Instant) -> Option<[u8; ARP_FRAME_LEN]> {
        let repr = ArpPacket::new_checked(frame.get(14..)?)
            .ok()
            .and_then(|p| ArpRepr::parse(&p).ok())?;
        let ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr: sha,
            source_protocol_addr: spa,
            target_protocol_addr: tpa,
            ..
        } = repr
        else {
            return None;
        };
        if tpa != self.ip {
            return None;
        }
        let unicast = sha.0[0] & 1 == 0 && sha.0 != [0; 6];
        if self.allowed.contains(&spa) && unicast {
            self.table.insert(spa, (sha.0, now));
            self.asked.remove(&spa);
        }
        if operation != ArpOperation::Request || !unicast {
            return None;
        }
        let answer = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(self.mac.0),
            source_protocol_addr: self.ip,
            target_hardware_addr: sha,
            target_protocol_addr: spa,
        };
        let mut out = [0u8; ARP_FRAME_LEN];
        out[..6].copy_from_slice(&sha.0);
        out[6..12].copy_from_slice(&self.mac.0);
        out[12..14].copy_from_slice(&[0x08, 0x06]);
        answer.emit(&mut ArpPacket::new_unchecked(&mut out[14..]));
        Some(out)
    }

    /// The MAC of chassis `ip`, or the request that asks for it.
    pub fn resolve(&mut self, ip: Ipv4Addr, now: Instant) -> Resolve {
        let known = self.table.get(&ip).copied();
        let fresh = known.is_some_and(|(_, t)| now.saturating_duration_since(t) < STALE);
        let ask = !fresh
            && self.allowed.contains(&ip)
            && self
                .asked
                .get(&ip)
                .is_none_or(|t| now.saturating_duration_since(*t) >= RETRY);
        let request = ask.then(|| {
            self.asked.insert(ip, now);
            let mut buf = Vec::new();
            arp_frame(&mut buf, self.mac, self.ip, ip, false);
            buf
        });
        Resolve {
            mac: known.map(|(m, _)| m),
            request,
        }
    }

    /// Chassis known.
    /// The MAC of `ip`, if known (fresh or not), without asking.
    pub fn get(&self, ip: Ipv4Addr) -> Option<[u8; 6]> {
        self.table.get(&ip).map(|(m, _)| *m)
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const MY_MAC: Mac = Mac([2, 0, 0, 0, 0, 1]);
    const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn request(from_mac: [u8; 6], from: Ipv4Addr, to: Ipv4Addr) -> Vec<u8> {
        let mut b = Vec::new();
        arp_frame(&mut b, Mac(from_mac), from, to, false);
        b
    }

    fn neigh() -> UnderlayNeigh {
        let mut n = UnderlayNeigh::new(ME, MY_MAC);
        n.set_allowed([PEER]);
        n
    }

    #[test]
    fn a_request_for_our_address_is_answered_and_teaches_the_asker() {
        let now = Instant::now();
        let mut n = neigh();
        let reply = n.on_arp(&request(PEER_MAC, PEER, ME), now).unwrap();
        // The reply, read back with smoltcp: we are at MY_MAC, to the asker.
        assert_eq!(&reply[..6], &PEER_MAC);
        let p = ArpPacket::new_checked(&reply[14..]).unwrap();
        let ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } = ArpRepr::parse(&p).unwrap()
        else {
            panic!()
        };
        assert_eq!(operation, ArpOperation::Reply);
        assert_eq!(source_hardware_addr.0, MY_MAC.0);
        assert_eq!((source_protocol_addr, target_protocol_addr), (ME, PEER));
        assert_eq!(n.resolve(PEER, now).mac, Some(PEER_MAC));
        // A request for someone else: neither answered nor learnt.
        let mut n = neigh();
        assert!(n
            .on_arp(&request(PEER_MAC, PEER, Ipv4Addr::new(198, 18, 0, 9)), now)
            .is_none());
        assert!(n.is_empty());
    }

    #[test]
    fn unknown_peers_are_asked_once_per_retry_and_learnt_from_the_reply() {
        let t0 = Instant::now();
        let mut n = neigh();
        let r = n.resolve(PEER, t0);
        assert_eq!(r.mac, None);
        let req = r.request.expect("a request");
        assert_eq!(&req[..6], &[0xff; 6]);
        let none = Resolve {
            mac: None,
            request: None,
        };
        assert_eq!(n.resolve(PEER, t0 + Duration::from_millis(500)), none);
        assert!(n.resolve(PEER, t0 + RETRY).request.is_some());
        // The reply (a request-shaped frame from PEER to us is as good).
        let mut reply = request(PEER_MAC, PEER, ME);
        reply[21] = 2;
        assert!(n.on_arp(&reply, t0 + RETRY).is_none());
        let r = n.resolve(PEER, t0 + RETRY);
        assert_eq!((r.mac, r.request), (Some(PEER_MAC), None));
        // Stale: still used, and asked again (once per RETRY).
        let later = t0 + STALE + Duration::from_secs(2);
        let r = n.resolve(PEER, later);
        assert_eq!(r.mac, Some(PEER_MAC));
        assert!(r.request.is_some());
        assert!(n.resolve(PEER, later).request.is_none());
    }

    #[test]
    fn hosts_that_are_no_chassis_are_not_learnt_nor_asked() {
        let now = Instant::now();
        let mut n = neigh();
        let stranger = Ipv4Addr::new(198, 18, 0, 66);
        // Answered (it asks for our address), but not learnt.
        assert!(n
            .on_arp(&request([2, 0, 0, 0, 0, 66], stranger, ME), now)
            .is_some());
        assert!(n.is_empty());
        assert_eq!(
            n.resolve(stranger, now),
            Resolve {
                mac: None,
                request: None
            }
        );
        // A multicast sender is never learnt nor answered; garbage is ignored.
        assert!(n
            .on_arp(&request([1, 0, 0, 0, 0, 2], PEER, ME), now)
            .is_none());
        assert!(n.is_empty());
        assert!(n.on_arp(&[0u8; 20], now).is_none());
        // A chassis leaving the NB leaves the table.
        n.on_arp(&request(PEER_MAC, PEER, ME), now);
        assert_eq!(n.len(), 1);
        n.set_allowed([]);
        assert!(n.is_empty());
    }
}
