//! What the pipeline decides for one frame: where its copies go (`Output`), the megaflow
//! that repeats the verdict in XDP, what it answered itself, what it taught, and the
//! translations and commits the forwarder carries out on this first packet.

use super::DropReason;
use crate::wire::geneve::OvnMetadata;
use geneflow_abi::{FlowAction, FlowKey};
use std::net::Ipv4Addr;

/// A provider neighbour an ARP frame taught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Learn {
    pub dp: u32,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// A reply: to be kept only if this chassis asked for `ip` (the forwarder knows).
    pub solicited: bool,
}

/// Where one copy of the frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Transmit the payload on a local interface.
    Local { ifindex: u32 },
    /// Transmit on a provider network's interface, tagged with `vlan` (`VLAN_PRESENT | vid`)
    /// when it is not 0.
    Provider { ifindex: u32, vlan: u16 },
    /// Encapsulate the payload in Geneve to a remote chassis.
    Tunnel {
        remote: Ipv4Addr,
        vni: u32,
        meta: OvnMetadata,
    },
}

/// A megaflow for the fast path. `action.generation` is filled in by whoever installs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Megaflow {
    pub key: FlowKey,
    pub mask: FlowKey,
    pub action: FlowAction,
}

/// What kind of frame the pipeline generated itself (sent only if its source is within rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    ArpReply,
    IcmpEchoReply,
    IcmpTimeExceeded,
    IcmpNetUnreachable,
    IcmpHostUnreachable,
    IcmpFragNeeded,
    /// An ARP request for a provider next hop (the packet that needed it is dropped).
    ArpRequest,
    /// A DHCP answer (rate limited per port, not per source).
    Dhcp,
}

/// A generated frame: its kind, and the address that asked for it (the rate-limit key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub kind: AnswerKind,
    pub source: Ipv4Addr,
}

/// A frame the pipeline dropped, and the drop megaflow that repeats the verdict in XDP when
/// the verdict allows it (`DropReason::cacheable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub reason: DropReason,
    pub megaflow: Option<Megaflow>,
}

/// The verdict for one frame: outputs are in the caller's vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Offset of the frame to output (non-zero after decapsulation).
    pub payload_offset: usize,
    /// The frame to output is the caller's scratch buffer (rewritten by a router, or an
    /// answer), not the received frame.
    pub rewritten: bool,
    /// Hash of the inner flow, for the outer UDP source port of tunnel outputs.
    pub flow_hash: u32,
    pub megaflow: Option<Megaflow>,
    /// Set when the pipeline answered (ARP, ICMP) instead of forwarding.
    pub answer: Option<Answer>,
    /// Zones the slow path commits the frame's connection in (the megaflow's action does it
    /// for the packets that follow).
    pub ct_commit: [u32; 2],
    /// The frame's whole key (the megaflow's is masked).
    pub key: FlowKey,
    /// A provider neighbour the frame taught (ARP seen on a provider network).
    pub learn: Option<Learn>,
    /// Default SNAT for the forwarder to carry out on this first packet (it owns the table).
    pub napt: Option<Napt>,
    /// A floating IP's translation of the frame (new source, new destination): what a
    /// `ct::POST_NAT` commit records.
    pub nat: (Option<Ipv4Addr>, Option<Ipv4Addr>),
}

impl Decision {
    /// The bytes to output: the received `frame` from `payload_offset`, or the scratch
    /// buffer `txbuf` the pipeline rewrote it into.
    pub fn payload<'a>(&self, frame: &'a [u8], txbuf: &'a [u8]) -> &'a [u8] {
        if self.rewritten {
            txbuf
        } else {
            &frame[self.payload_offset..]
        }
    }

    /// The connections to commit for this first packet (`ct_commit`): per zone, the tuple as
    /// it arrived, or as translated for a `ct::POST_NAT` zone.
    pub fn ct_commit_keys(&self) -> impl Iterator<Item = geneflow_abi::CtKey> + '_ {
        use geneflow_abi::ct::POST_NAT;
        self.ct_commit
            .into_iter()
            .filter(|z| *z != 0)
            .map(move |zone| {
                let post = zone & POST_NAT != 0;
                let ip = |a: Option<Ipv4Addr>, k: u32| match (post, a) {
                    (true, Some(a)) => u32::from_ne_bytes(a.octets()),
                    _ => k,
                };
                geneflow_abi::CtKey {
                    zone: zone & !POST_NAT,
                    src: ip(self.nat.0, self.key.ip_src),
                    dst: ip(self.nat.1, self.key.ip_dst),
                    sport: self.key.l4_src,
                    dport: self.key.l4_dst,
                    proto: self.key.ip_proto,
                    pad: [0; 3],
                }
            })
    }
}

/// Default SNAT the pipeline decided (`flag::NAPT`, `act::UNNAPT`); the forwarder allocates
/// or looks up the translation and rewrites the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Napt {
    /// Out through `external`; replies go back to VM port `ifindex`, from MAC `smac` (its
    /// router port) to `dmac` (the VM).
    Out {
        external: Ipv4Addr,
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// A reply to the external address: back to whoever the table says.
    In,
}
