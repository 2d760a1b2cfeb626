//! The ABI between the XDP program and userspace: megaflow key/mask, actions, per-port
//! configuration and counter layout. Everything here is `#[repr(C)]`, has explicit padding (hash
//! keys are compared bytewise, so no byte may be left uninitialised) and is shared verbatim by
//! both sides, so a layout change can never drift between them.
#![no_std]

/// Version of the layout of every map below. Bump it on any change to a map's key or value type
/// or capacity: a restarted agent adopts pinned maps only of its own ABI version (an upgrade
/// across versions swaps in fresh maps and the slow path refills them).
pub const ABI_VERSION: u32 = 11;

/// Upper bound of each ordered mask list the XDP program walks (tuple-space search).
pub const MAX_MASKS: u32 = 16;
/// One mask list per kind of ingress port, so that a frame is never looked up under the masks
/// of the other kind (whose entries can never match its in_port): VM ports, then the uplink.
pub const MASK_LISTS: u32 = 2;
pub mod mask_list {
    pub const VM: u32 = 0;
    pub const UPLINK: u32 = 1;
}
/// Megaflow table capacity (OVS' kernel datapath defaults to 200,000 flows). The table is
/// not preallocated (`BPF_F_NO_PREALLOC`): it costs the memory of what it holds (lookups
/// measured no slower: encap 248-251, decap 235-241 ns/packet in the same kind of run).
pub const MAX_FLOWS: u32 = 262_144;
/// Interfaces the datapath can be attached to at once (counter slots, XSKMAP entries).
pub const MAX_PORTS: u32 = 64;
/// Receive queues per interface that get a slow-path socket: XSKMAP entry `slot * MAX_QUEUES +
/// queue` (an AF_XDP socket only takes frames of the queue it is bound to). A frame missing on
/// a higher queue counts drop_xsk; `ethtool -L` brings a NIC's queue count within it.
pub const MAX_QUEUES: u32 = 16;
/// Logical datapaths tracked by the generation map (`GENS`, an array of slots).
pub const MAX_DATAPATHS: u32 = 16384;
/// Chassis this one accepts Geneve from (`PEERS`: encap IPv4, network byte order -> 1).
pub const MAX_PEERS: u32 = 16384;
/// Generation slot (`FlowAction::dp_key`) of the set of datapaths a chassis hosts: no logical
/// datapath has tunnel key 0, and the drop entries for unknown VNIs use it, so that hosting a
/// new datapath makes them stale.
pub const DP_KEY_HOSTED: u32 = 0;

/// Geneve UDP destination port (IANA).
pub const GENEVE_PORT: u16 = 6081;
/// Outer overhead of Geneve with the OVN metadata option over IPv4:
/// Ethernet 14 + IPv4 20 + UDP 8 + Geneve 8 + option 8.
pub const ENCAP_OVERHEAD: u32 = 58;
/// OVN's Geneve option class and type carrying the logical ingress/egress port keys.
pub const OVN_OPT_CLASS: u16 = 0x0102;
pub const OVN_OPT_TYPE: u8 = 0x80;

/// The fields a megaflow can match on. Also used as the mask (same layout, bits set where the
/// slow path consulted the field). 40 bytes = 5 u64 so the XDP program can mask word-wise.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub in_ifindex: u32,
    /// Geneve VNI of a received tunnel frame (0 for frames from local ports).
    pub tun_vni: u32,
    /// Logical egress port key from the OVN option of a received tunnel frame.
    pub tun_out_port: u16,
    /// Ethertype, network byte order.
    pub eth_type: u16,
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    /// IPv4 addresses, network byte order.
    pub ip_src: u32,
    pub ip_dst: u32,
    /// L4 ports, network byte order.
    pub l4_src: u16,
    pub l4_dst: u16,
    pub ip_proto: u8,
    /// Index of the mask this key was built with; part of the hash key so that entries of
    /// different masks never collide.
    pub mask_id: u8,
    /// Connection state (`ct::*` bits) from the CT table, 0 where conntrack is off.
    pub ct_state: u8,
    /// TCP flags, for conntrack; in no mask, so never part of a megaflow.
    pub pad: u8,
}

pub const FLOW_KEY_WORDS: usize = 5;
const _: () = assert!(core::mem::size_of::<FlowKey>() == FLOW_KEY_WORDS * 8);

impl FlowKey {
    pub const fn zeroed() -> Self {
        FlowKey {
            in_ifindex: 0,
            tun_vni: 0,
            tun_out_port: 0,
            eth_type: 0,
            eth_dst: [0; 6],
            eth_src: [0; 6],
            ip_src: 0,
            ip_dst: 0,
            l4_src: 0,
            l4_dst: 0,
            ip_proto: 0,
            mask_id: 0,
            ct_state: 0,
            pad: 0,
        }
    }

    /// Word view used for masking; the struct has no padding and is 8-byte sized.
    pub fn to_words(&self) -> [u64; FLOW_KEY_WORDS] {
        let mut w = [0u64; FLOW_KEY_WORDS];
        let bytes = self.as_bytes();
        let mut i = 0;
        while i < FLOW_KEY_WORDS {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            w[i] = u64::from_ne_bytes(b);
            i += 1;
        }
        w
    }

    pub fn as_bytes(&self) -> &[u8; 40] {
        // SAFETY: FlowKey is repr(C), 40 bytes, all fields plain integers with no padding
        // (checked by the size assertion above), so every byte is initialised.
        unsafe { &*(self as *const FlowKey as *const [u8; 40]) }
    }

    /// Field-wise AND, used by userspace to build the stored (masked) key. The XDP program
    /// does the same word-wise.
    pub fn masked(&self, mask: &FlowKey) -> FlowKey {
        let mut out = FlowKey::zeroed();
        out.in_ifindex = self.in_ifindex & mask.in_ifindex;
        out.tun_vni = self.tun_vni & mask.tun_vni;
        out.tun_out_port = self.tun_out_port & mask.tun_out_port;
        out.eth_type = self.eth_type & mask.eth_type;
        let mut i = 0;
        while i < 6 {
            out.eth_dst[i] = self.eth_dst[i] & mask.eth_dst[i];
            out.eth_src[i] = self.eth_src[i] & mask.eth_src[i];
            i += 1;
        }
        out.ip_src = self.ip_src & mask.ip_src;
        out.ip_dst = self.ip_dst & mask.ip_dst;
        out.l4_src = self.l4_src & mask.l4_src;
        out.l4_dst = self.l4_dst & mask.l4_dst;
        out.ip_proto = self.ip_proto & mask.ip_proto;
        out.ct_state = self.ct_state & mask.ct_state;
        out
    }
}

/// Hash of the inner flow identity (L2-L4 fields of the key, not the in-port or tunnel fields),
/// used for the outer UDP source port. Shared so the fast and slow paths pick the same port.
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let w = k.to_words();
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    // Word 1: tun_out_port (bits 0..16, excluded), eth_type, first 4 bytes of eth_dst.
    h ^= w[1] >> 16;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= w[2];
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= w[3];
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    // Word 4: l4 ports and ip_proto; mask_id and padding excluded.
    h ^= w[4] & 0x00ff_ffff_ffff;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    (h ^ (h >> 29)) as u32
}

/// Outer UDP source port for a flow hash, in the range OVS uses (32768..61000).
#[inline(always)]
pub fn udp_source_port(hash: u32) -> u16 {
    32768 + (hash % 28232) as u16
}

/// Megaflow action kinds.
pub mod act {
    /// Redirect the frame unchanged to `out_ifindex`.
    pub const OUTPUT: u32 = 1;
    /// Push outer Ethernet/IPv4/UDP/Geneve(+OVN option), resolve the underlay next hop with
    /// `bpf_fib_lookup` and redirect to the uplink.
    pub const ENCAP: u32 = 2;
    /// Strip the outer headers of a Geneve frame and redirect the inner frame to `out_ifindex`.
    pub const DECAP_OUTPUT: u32 = 3;
    /// Drop with `drop_reason` counted.
    pub const DROP: u32 = 4;
    /// Hand to the kernel stack.
    pub const PASS: u32 = 5;
    /// Turn an ARP request into the reply of `set_smac` (the owner of the target address) and
    /// send it back out of the port it came in on (ARP responder).
    pub const ARP_REPLY: u32 = 6;
    /// From a provider network to the chassis' external address: the NAT table's
    /// `nat::DIR_IN` entry of the frame's tuple gives the VM, its address and port; routed
    /// there (`flag::ROUTE` checks, MACs, TTL) with the destination rewritten. No entry:
    /// dropped (`drop_no_nat`): nothing inbound is let in that no VM started.
    pub const UNNAPT: u32 = 7;
}

/// How ARP frames are keyed: like OVS, the sender and target protocol addresses go into
/// `ip_src`/`ip_dst` and the opcode into `ip_proto`, for well-formed Ethernet/IPv4 ARP only
/// (hardware type 1, protocol 0x0800, lengths 6 and 4, opcode 1 or 2). A malformed ARP frame
/// has `ip_proto` 0; a gratuitous one (sender address = target address) has the opcode with
/// `GRATUITOUS` set, so that a responder entry never matches it.
pub mod arp {
    pub const OP_REQUEST: u8 = 1;
    pub const OP_REPLY: u8 = 2;
    pub const GRATUITOUS: u8 = 0x80;
    /// The sender hardware address in the ARP payload differs from the Ethernet source.
    pub const SHA_MISMATCH: u8 = 0x40;
    /// Ethernet header + ARP payload for Ethernet/IPv4.
    pub const FRAME_LEN: usize = 42;
}

/// Action flags.
pub mod flag {
    /// Compute the outer UDP checksum on encap (otherwise it is sent as zero, RFC 8926 3.3).
    pub const UDP_CSUM: u32 = 1;
    /// `nh_dmac`/`nh_smac` are valid; `out_ifindex` is the uplink to redirect to.
    pub const NH_CACHED: u32 = 2;
    /// Routed by a logical router: the IPv4 header must be option-free with a valid checksum
    /// and a source that is not martian (else dropped, counted), TTL > 1 and, if it is to be
    /// encapsulated, small enough or DF clear (else to the slow path, which answers with
    /// ICMP); then source/destination MAC := `set_smac`/`set_dmac` and TTL - 1 (checksum
    /// updated incrementally) before the output or encap.
    pub const ROUTE: u32 = 4;
    /// A new connection that the security groups allow: commit it to conntrack
    /// (`ct_zones`), so its later packets and replies are established.
    pub const CT_COMMIT: u32 = 8;
    /// With `ROUTE`: IPv4 source := `nat_src`, destination := `nat_dst`, the IPv4 checksum and
    /// (first fragments) the TCP/UDP checksum updated incrementally (`csum_replace4`).
    pub const SNAT: u32 = 16;
    pub const DNAT: u32 = 32;
    /// Default SNAT through the chassis' external address: before anything else, the NAT
    /// table's `nat::DIR_OUT` entry of the packet's tuple (TCP/UDP ports, ICMP echo id) gives
    /// the source address and port to write (after the `ROUTE` rewrite); no entry: slow path,
    /// which allocates one.
    pub const NAPT: u32 = 64;
}

/// Default SNAT (`flag::NAPT`, `act::UNNAPT`): a table of translations keyed like conntrack
/// (`CtKey`, `zone` = direction, and the VM port for outbound entries), one entry per
/// direction of each connection, written by the slow path at the first packet, read by XDP,
/// expired when idle by the agent, both directions together. A plain hash, not an LRU: a full
/// table refuses new connections rather than split a live one.
pub mod nat {
    /// `CtKey::zone` of the outbound entry: the VM's tuple -> the external address and port.
    pub const DIR_OUT: u32 = 1;
    /// `CtKey::zone` of the inbound entry: the reply's tuple (remote -> external address and
    /// port) -> the VM's address and port and how to reach it.
    pub const DIR_IN: u32 = 2;
    pub const MAX_ENTRIES: u32 = 131_072;
    /// External ports handed out: 1024..=65535 per (protocol, remote address and port).
    pub const PORT_MIN: u16 = 1024;
    /// The direction bits of `CtKey::zone`.
    pub const DIR_MASK: u32 = 0xff;
    /// `NatEntry::flags`: a reply used the inbound half.
    pub const REPLIED: u32 = 1;
    /// `NatEntry::flags`: a TCP FIN or RST went through.
    pub const CLOSING: u32 = 2;

    /// `CtKey::zone` of an outbound entry: the direction, and the VM port the connection
    /// comes from, so that VMs of different tenants with the same address never share one.
    #[inline(always)]
    pub const fn out_zone(ifindex: u32) -> u32 {
        DIR_OUT | ifindex << 8
    }
}

/// A floating IP bound here whose port is tracked (`FIP_CT`, keyed by the external address):
/// frames from a provider network to it are looked up in conntrack as the VM will see them,
/// in its zone, before the megaflow lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FipCt {
    pub fixed: u32,
    pub zone: u32,
}

pub const MAX_FIPS: u32 = 4096;

/// One direction of a default-SNAT translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    /// DIR_OUT: the new source; DIR_IN: the new destination (network byte order).
    pub addr: u32,
    /// The new source (DIR_OUT) or destination (DIR_IN) port, or ICMP echo id (network order).
    pub port: u16,
    pub pad: u16,
    /// DIR_IN: the VM port the reply goes to, its counter slot, and the MACs it is rewritten
    /// with (the router port's, the VM's).
    pub out_ifindex: u32,
    pub out_slot: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// `nat::REPLIED` (DIR_IN: a reply came back), `nat::CLOSING` (a TCP FIN or RST went
    /// through this way): what the expiry's shorter timeouts go by.
    pub flags: u32,
    /// CLOCK_MONOTONIC_COARSE of the last packet this way, for expiry.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<NatEntry>() == 40);

/// `csum_replace4` for a 16-bit field (a port or an ICMP echo id), taken as it lies in memory.
#[inline(always)]
pub fn csum_replace2(csum: u16, old: u16, new: u16) -> u16 {
    let mut s: u32 = (!csum) as u32 + (!old) as u32 + new as u32;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// RFC 1624 incremental update of the one's complement checksum `csum` for a 32-bit field
/// changing from `old` to `new`. All three are taken as they lie in memory (read with native
/// loads of network-order bytes): the one's complement sum does not depend on the byte order
/// as long as every term is read the same way. Shared by XDP and the slow path.
#[inline(always)]
pub fn csum_replace4(csum: u16, old: u32, new: u32) -> u16 {
    let mut s: u32 = (!csum) as u32;
    s += (!old & 0xffff) + (!old >> 16);
    s += (new & 0xffff) + (new >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// Connection tracking (`CT`, an LRU hash). Entries are keyed by zone (a logical datapath's
/// key) and the 5-tuple of the connection's first packet; a packet whose own tuple is there is
/// `EST`, one whose reversed tuple is there is `EST | REPLY`, any other is `NEW`. ICMP is
/// tracked per address pair (ports 0).
pub mod ct {
    pub const NEW: u8 = 1;
    pub const EST: u8 = 2;
    pub const REPLY: u8 = 4;
    /// An ICMP error (destination unreachable, time exceeded, parameter problem) about a
    /// packet of a tracked connection, either way: it passes like the connection's replies.
    pub const RELATED: u8 = 8;
    pub const MAX_ENTRIES: u32 = 65536;
    /// In `FlowAction::ct_zones`: commit the connection as the translated packet carries it
    /// (`nat_src`/`nat_dst` of `flag::SNAT`/`flag::DNAT`), as the destination VM sees it
    /// (to-lport ACL after a floating IP's DNAT), not as it arrived.
    pub const POST_NAT: u32 = 1 << 31;
    /// `CtEntry::flags`: the TCP connection is closing (FIN or RST seen).
    pub const CLOSING: u32 = 1;
    /// How long a closing TCP connection stays (like Cilium's close timeout).
    pub const CLOSING_TIMEOUT_S: u64 = 10;
    /// The per-CPU connection cache (`CT_CACHE`): blocks of `CACHE_BLOCK_SLOTS` slots, each
    /// block one value of a per-CPU array (a per-CPU value may not exceed 32 KB), slots in
    /// pairs (2-way set associative). 4096 slots, 128 KB per CPU.
    pub const CACHE_BLOCKS: u32 = 4;
    pub const CACHE_BLOCK_SLOTS: usize = 1024;

    /// How long an idle entry lives, in seconds: by IP protocol (like Cilium's defaults:
    /// TCP 6 h, UDP 60 s, others 30 s), `CLOSING_TIMEOUT_S` once `flags` has `CLOSING`.
    pub const fn idle_timeout_s(proto: u8, flags: u32) -> u64 {
        if flags & CLOSING != 0 {
            return CLOSING_TIMEOUT_S;
        }
        match proto {
            6 => 6 * 3600,
            17 => 60,
            _ => 30,
        }
    }
}

/// One slot of the per-CPU connection cache in front of `CT`, in the manner of OVS's exact
/// match cache: the last established tuple seen at this slot, its state, and the epoch
/// (`Config::ct_epoch`) it was looked up in. A hit skips the LRU-hash lookup (measured at
/// ~50 ns per packet on the reference VM, against ~10 ns for this slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtCacheSlot {
    pub key: CtKey,
    pub epoch: u32,
    pub state: u8,
    pub pad: [u8; 7],
}
// Half a cache line: a cache hit touches one line.
const _: () = assert!(core::mem::size_of::<CtCacheSlot>() == 32);

/// One value of `CT_CACHE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtCacheBlock {
    pub slots: [CtCacheSlot; ct::CACHE_BLOCK_SLOTS],
}
const _: () = assert!(core::mem::size_of::<CtCacheBlock>() == 32 * 1024);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub zone: u32,
    /// Network byte order, as in `FlowKey`.
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) of the commit, and of the last
    /// packet either way to within a second.
    pub last_seen_ns: u64,
    pub created_ns: u64,
    pub reserved: u64,
    /// `ct::CLOSING` once a FIN or RST went through.
    pub flags: u32,
    pub pad: u32,
}

/// Prepended by XDP to every frame it hands to the slow path (AF_XDP): what XDP learnt that
/// the frame does not carry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlowMeta {
    pub magic: u16,
    pub ct_state: u8,
    pub pad0: u8,
    /// From a provider interface: the 802.1Q tag XDP took off (`VLAN_PRESENT | vid`), or 0.
    pub vlan: u16,
    pub pad: [u8; 2],
}

/// A frame from a provider interface carries its 802.1Q VLAN id in `FlowKey::tun_vni` (and
/// `SlowMeta::vlan`) with this bit set; an untagged one has 0. XDP takes the tag off on the
/// way in and puts it on on the way out (`FlowAction::vlan`).
pub const VLAN_PRESENT: u16 = 0x1000;

impl SlowMeta {
    pub const MAGIC: u16 = 0x6766;
    pub const LEN: usize = 8;
}

/// The value of a megaflow entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowAction {
    pub kind: u32,
    pub out_ifindex: u32,
    /// Logical datapath this entry was derived from and its generation at install time; an
    /// entry whose generation differs from the live one (`GENS[gen_slot]`) is stale and
    /// skipped.
    pub dp_key: u32,
    pub generation: u32,
    pub drop_reason: u32,
    pub flags: u32,
    /// Outer IPv4 addresses for ENCAP, network byte order.
    pub encap_src: u32,
    pub encap_dst: u32,
    pub vni: u32,
    /// OVN option value: 1 reserved bit, 15-bit ingress port key, 16-bit egress port key.
    pub ovn_opt: u32,
    /// Largest inner frame (Ethernet header included) that may be encapsulated.
    pub max_inner_len: u32,
    /// Counter slot of the interface the action transmits on (set by userspace at install),
    /// so the fast path counts tx per interface without another PORTS lookup.
    pub out_slot: u32,
    /// Underlay next hop resolved by userspace at install time (flag::NH_CACHED): saves the
    /// per-packet `bpf_fib_lookup`. A neighbour change bumps every generation.
    pub nh_dmac: [u8; 6],
    pub nh_smac: [u8; 6],
    /// Rewrites of `flag::ROUTE` and the answering MAC of `act::ARP_REPLY`.
    pub set_smac: [u8; 6],
    pub set_dmac: [u8; 6],
    /// `flag::CT_COMMIT`: the zones the frame's connection is committed in (0 = none).
    pub ct_zones: [u32; 2],
    /// `flag::SNAT` / `flag::DNAT`: the IPv4 source / destination to write (network byte
    /// order), floating IPs' one-to-one translation.
    pub nat_src: u32,
    pub nat_dst: u32,
    /// Out to a provider network on a VLAN: the tag to put on (`VLAN_PRESENT | vid`), or 0.
    pub vlan: u16,
    pub pad_vlan: u16,
    /// The datapath's slot in `GENS` (set by userspace at install): an array index, so the
    /// generation check costs no hash lookup.
    pub gen_slot: u32,
    /// Packets that used this entry, counted by XDP (approximate under concurrent CPUs:
    /// incremented without an atomic to keep the hot path cheap). Userspace writes 0.
    pub hits: u64,
}

/// Per-interface configuration, keyed by ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortConf {
    /// Counter and XSKMAP slot.
    pub slot: u32,
    pub kind: u32,
    /// For uplinks: the local encap IPv4 (network byte order); Geneve frames to another address
    /// are not ours and go to the stack.
    pub local_ip: u32,
    /// Conntrack zone of frames from this (VM) port: its datapath's key; 0 = no conntrack.
    pub ct_zone: u32,
}

pub mod port_kind {
    pub const VM: u32 = 1;
    pub const UPLINK: u32 = 2;
    /// A provider (physical, untunnelled) network's interface: plain Ethernet frames, looked
    /// up in the VM mask list.
    pub const PROVIDER: u32 = 3;
}

/// Counter indices and names (`ctr.rs`).
pub mod ctr;

/// One interface's counters (the value of the per-CPU counter array, one entry per slot):
/// one map lookup per packet serves every counter it bumps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortCounters {
    pub c: [u64; ctr::COUNT as usize],
}

impl Default for PortCounters {
    fn default() -> Self {
        PortCounters {
            c: [0; ctr::COUNT as usize],
        }
    }
}

/// Global program configuration (array slot 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Number of valid entries in each mask list (`mask_list::*`); list `l`'s masks are at
    /// MASKS[l * MAX_MASKS ..].
    pub n_masks: [u32; MASK_LISTS as usize],
    /// The order in which each list's masks are tried (slots within the list): the tuple
    /// space search stops at the first mask with a matching entry, so userspace keeps the
    /// masks most packets hit first (`MASK_HITS`). Entries at or past `n_masks` are skipped.
    pub order: [[u8; MAX_MASKS as usize]; MASK_LISTS as usize],
    /// Bumped whenever `PEERS` changes: invalidates the per-CPU cache of the last accepted
    /// outer source.
    pub peers_gen: u32,
    /// Nonzero: frames from the uplink are looked up in conntrack, in the zone of their VNI.
    pub ct_uplink: u32,
    /// Validity epoch of the per-CPU connection cache (`CT_CACHE`): a slot counts only if it
    /// was written in this epoch. Userspace bumps it about once a second and after deleting
    /// any conntrack entry; never 0 (an unwritten slot).
    pub ct_epoch: u32,
    /// Bumped whenever `PORTS` changes: invalidates the per-CPU cache of the last
    /// interface's configuration.
    pub ports_gen: u32,
}

/// The live generation of one logical datapath, and a fingerprint of everything its megaflows
/// were computed from, so that a restarted agent can tell whether they are still right.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DpGen {
    /// 0: a free slot (no entry's generation is 0).
    pub generation: u32,
    /// The datapath in this slot (`FlowAction::dp_key`), so that a restarted agent finds
    /// each datapath's slot again.
    pub dp_key: u32,
    pub fingerprint: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all these types are repr(C), Copy, contain only integers and have no implicit
    // padding, so any bit pattern is valid and they can be copied to and from BPF maps.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtCacheBlock {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowAction {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortConf {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DpGen {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtEntry {}
    // SAFETY: repr(C), plain integers and byte arrays, explicit padding: any bit pattern valid.
    unsafe impl aya::Pod for super::NatEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FipCt {}
}
