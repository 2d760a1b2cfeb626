//! The sans-IO userspace pipeline: given a frame, the interface it arrived on and the compiled
//! tables, decide where it goes (local ports, Geneve tunnels) and which megaflow (key, mask,
//! action) the XDP fast path can use for the packets that follow. No I/O, no allocation per
//! packet (outputs go into a caller-owned vector), unit-tested without a kernel.

use crate::wire::geneve::{self, OvnMetadata};
use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, UdpHeader};
use geneflow_abi::{
    act, ctr, flag, flow_hash, udp_source_port, FlowAction, FlowKey, ENCAP_OVERHEAD, GENEVE_PORT,
};
use geneflow_control::compiler::{Pipeline, PortLocation};
use geneflow_control::model::{Mac, MC_FLOOD_KEY};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

/// FNV-1a: a hash that, unlike std's, is fixed across Rust releases, so fingerprints stored
/// by one build compare equal in the next.
#[derive(Default)]
struct Fnv1a(Option<u64>);

impl std::hash::Hasher for Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        let mut h = self.0.unwrap_or(0xcbf2_9ce4_8422_2325);
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = Some(h);
    }

    fn finish(&self) -> u64 {
        self.0.unwrap_or(0xcbf2_9ce4_8422_2325)
    }
}

/// Why the slow path dropped a frame. Each maps to a counter shared with the XDP program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    Malformed,
    NotOverlay,
    GeneveVersion,
    GeneveTruncated,
    GeneveOptLen,
    GeneveCriticalOpt,
    GeneveProtocol,
    GeneveNoMetadata,
    UnknownDatapath,
    UnknownPort,
    UnknownInPort,
    NoDestination,
    TooBig,
}

impl DropReason {
    pub fn counter(self) -> u32 {
        match self {
            DropReason::Malformed | DropReason::NotOverlay | DropReason::UnknownInPort => {
                ctr::DROP_MALFORMED
            }
            DropReason::GeneveVersion => ctr::DROP_GENEVE_VERSION,
            DropReason::GeneveTruncated => ctr::DROP_GENEVE_TRUNCATED,
            DropReason::GeneveOptLen => ctr::DROP_GENEVE_OPT_LEN,
            DropReason::GeneveCriticalOpt => ctr::DROP_GENEVE_CRITICAL_OPT,
            DropReason::GeneveProtocol => ctr::DROP_GENEVE_PROTOCOL,
            DropReason::GeneveNoMetadata => ctr::DROP_GENEVE_NO_METADATA,
            DropReason::UnknownDatapath => ctr::DROP_UNKNOWN_DATAPATH,
            DropReason::UnknownPort => ctr::DROP_UNKNOWN_PORT,
            DropReason::NoDestination => ctr::DROP_NO_DEST,
            DropReason::TooBig => ctr::DROP_TOO_BIG,
        }
    }
}

impl From<geneve::Error> for DropReason {
    fn from(e: geneve::Error) -> Self {
        match e {
            geneve::Error::Truncated(_) => DropReason::GeneveTruncated,
            geneve::Error::BadVersion(_) => DropReason::GeneveVersion,
            geneve::Error::OptionsTruncated { .. } | geneve::Error::BadOptionLength { .. } => {
                DropReason::GeneveOptLen
            }
            geneve::Error::UnknownCriticalOption { .. } => DropReason::GeneveCriticalOpt,
        }
    }
}

/// Where one copy of the frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Transmit the payload unchanged on a local interface.
    Local { ifindex: u32 },
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

/// The verdict for one frame: outputs are in the caller's vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Offset of the frame to output (non-zero after decapsulation).
    pub payload_offset: usize,
    /// Hash of the inner flow, for the outer UDP source port of tunnel outputs.
    pub flow_hash: u32,
    pub megaflow: Option<Megaflow>,
}

#[derive(Debug, Clone, Copy)]
struct InPort {
    dp_key: u32,
    port_key: u16,
}

/// The compiled pipeline bound to this host's interfaces (names resolved to ifindexes).
#[derive(Debug, Clone)]
pub struct Tables {
    pub pipeline: Arc<Pipeline>,
    pub uplink_ifindex: u32,
    pub uplink_mtu: u32,
    pub udp_csum: bool,
    ports: HashMap<u32, InPort>,
    ifindex_by_iface: HashMap<String, u32>,
}

impl Tables {
    /// Binds `pipeline` to interfaces; `resolve` maps an interface name to its ifindex (ports
    /// whose interface does not exist yet are left out until the next bind).
    pub fn new(
        pipeline: Arc<Pipeline>,
        uplink_ifindex: u32,
        uplink_mtu: u32,
        udp_csum: bool,
        resolve: impl Fn(&str) -> Option<u32>,
    ) -> Tables {
        let mut ports = HashMap::new();
        let mut ifindex_by_iface = HashMap::new();
        for b in pipeline.bindings.values() {
            if let Some(ix) = resolve(&b.iface) {
                ports.insert(
                    ix,
                    InPort {
                        dp_key: b.tunnel_key,
                        port_key: b.key,
                    },
                );
                ifindex_by_iface.insert(b.iface.clone(), ix);
            }
        }
        Tables {
            pipeline,
            uplink_ifindex,
            uplink_mtu,
            udp_csum,
            ports,
            ifindex_by_iface,
        }
    }

    pub fn ifindex(&self, iface: &str) -> Option<u32> {
        self.ifindex_by_iface.get(iface).copied()
    }

    /// One fingerprint per logical datapath of everything its megaflows are computed from: the
    /// compiled datapath, the interfaces its local ports are attached as, the uplink and its
    /// next-hop source MAC (`uplink_mac`), the encap IP and options, and this build. Equal
    /// fingerprints mean the installed entries are still exact, so a restarted agent keeps them.
    pub fn fingerprints(&self, uplink_mac: [u8; 6]) -> std::collections::BTreeMap<u32, u64> {
        use std::hash::{Hash, Hasher};
        self.pipeline
            .datapaths
            .iter()
            .map(|(key, dp)| {
                let mut h = Fnv1a::default();
                geneflow_abi::ABI_VERSION.hash(&mut h);
                env!("CARGO_PKG_VERSION").hash(&mut h);
                dp.hash(&mut h);
                self.pipeline.encap_ip.hash(&mut h);
                (
                    self.uplink_ifindex,
                    self.uplink_mtu,
                    self.udp_csum,
                    uplink_mac,
                )
                    .hash(&mut h);
                for (_, iface) in dp.local_ports() {
                    self.ifindex(iface).hash(&mut h);
                }
                (*key, h.finish())
            })
            .collect()
    }

    /// Largest inner frame (with its Ethernet header) that fits the uplink once encapsulated.
    pub fn max_inner_len(&self) -> u32 {
        self.uplink_mtu + 14 - ENCAP_OVERHEAD
    }

    /// Runs the logical pipeline on one frame.
    pub fn process(
        &self,
        frame: &[u8],
        in_ifindex: u32,
        out: &mut Vec<Output>,
    ) -> Result<Decision, DropReason> {
        out.clear();
        if in_ifindex == self.uplink_ifindex {
            self.ingress_tunnel(frame, in_ifindex, out)
        } else {
            self.ingress_local(frame, in_ifindex, out)
        }
    }

    fn ingress_local(
        &self,
        frame: &[u8],
        in_ifindex: u32,
        out: &mut Vec<Output>,
    ) -> Result<Decision, DropReason> {
        let inp = *self
            .ports
            .get(&in_ifindex)
            .ok_or(DropReason::UnknownInPort)?;
        let key = extract_key(frame, in_ifindex).ok_or(DropReason::Malformed)?;
        let hash = flow_hash(&key);
        let dp = self
            .pipeline
            .datapaths
            .get(&inp.dp_key)
            .ok_or(DropReason::UnknownDatapath)?;
        let dst = Mac(key.eth_dst);
        let mut decision = Decision {
            payload_offset: 0,
            flow_hash: hash,
            megaflow: None,
        };
        if dst.is_multicast() {
            // Flood: every other local port, and one copy per remote chassis hosting the
            // switch (ingress replication); the receivers flood to their own ports.
            for (p, iface) in dp.local_ports() {
                if p.key == inp.port_key {
                    continue;
                }
                if let Some(ix) = self.ifindex(iface) {
                    out.push(Output::Local { ifindex: ix });
                }
            }
            for (_, ip) in &dp.remote_chassis {
                out.push(Output::Tunnel {
                    remote: *ip,
                    vni: dp.tunnel_key,
                    meta: OvnMetadata {
                        ingress: inp.port_key,
                        egress: MC_FLOOD_KEY,
                    },
                });
            }
            return Ok(decision);
        }
        let dst_key = *dp.macs.get(&dst).ok_or(DropReason::NoDestination)?;
        let port = dp.ports.get(&dst_key).ok_or(DropReason::NoDestination)?;
        let mut mask = FlowKey::zeroed();
        mask.in_ifindex = u32::MAX;
        mask.eth_dst = [0xff; 6];
        let mut action = FlowAction {
            dp_key: dp.tunnel_key,
            ..Default::default()
        };
        match &port.location {
            PortLocation::Local { iface } => {
                let ix = self.ifindex(iface).ok_or(DropReason::NoDestination)?;
                if ix == in_ifindex {
                    return Err(DropReason::NoDestination);
                }
                out.push(Output::Local { ifindex: ix });
                action.kind = act::OUTPUT;
                action.out_ifindex = ix;
            }
            PortLocation::Remote { encap_ip, .. } => {
                let local = self.pipeline.encap_ip.ok_or(DropReason::NoDestination)?;
                if frame.len() as u32 > self.max_inner_len() {
                    return Err(DropReason::TooBig);
                }
                let meta = OvnMetadata {
                    ingress: inp.port_key,
                    egress: port.key,
                };
                out.push(Output::Tunnel {
                    remote: *encap_ip,
                    vni: dp.tunnel_key,
                    meta,
                });
                action.kind = act::ENCAP;
                action.out_ifindex = self.uplink_ifindex;
                action.encap_src = u32::from_ne_bytes(local.octets());
                action.encap_dst = u32::from_ne_bytes(encap_ip.octets());
                action.vni = dp.tunnel_key;
                action.ovn_opt = meta.value();
                action.max_inner_len = self.max_inner_len();
                action.flags = if self.udp_csum { flag::UDP_CSUM } else { 0 };
            }
            PortLocation::Unbound => return Err(DropReason::NoDestination),
        }
        decision.megaflow = Some(Megaflow {
            key: key.masked(&mask),
            mask,
            action,
        });
        Ok(decision)
    }

    fn ingress_tunnel(
        &self,
        frame: &[u8],
        in_ifindex: u32,
        out: &mut Vec<Output>,
    ) -> Result<Decision, DropReason> {
        let (eth, rest) = Ethernet2Header::from_slice(frame).map_err(|_| DropReason::Malformed)?;
        if eth.ether_type != EtherType::IPV4 {
            return Err(DropReason::NotOverlay);
        }
        let (ip, _) = Ipv4Header::from_slice(rest).map_err(|_| DropReason::NotOverlay)?;
        if ip.protocol != IpNumber::UDP || ip.is_fragmenting_payload() {
            return Err(DropReason::NotOverlay);
        }
        if Some(Ipv4Addr::from(ip.destination)) != self.pipeline.encap_ip {
            return Err(DropReason::NotOverlay);
        }
        let ip_len = ip.header_len();
        let udp_off = 14 + ip_len;
        let (udp, _) =
            UdpHeader::from_slice(&frame[udp_off..]).map_err(|_| DropReason::NotOverlay)?;
        if udp.destination_port != GENEVE_PORT {
            return Err(DropReason::NotOverlay);
        }
        let gnv_off = udp_off + 8;
        let pkt = geneve::Packet::new_checked(&frame[gnv_off..])?;
        let repr = geneve::Repr::parse(&pkt)?;
        if repr.protocol != geneve::PROTO_ETHERNET {
            return Err(DropReason::GeneveProtocol);
        }
        let meta = repr.ovn.ok_or(DropReason::GeneveNoMetadata)?;
        let inner_off = gnv_off + pkt.header_len();
        let inner = &frame[inner_off..];
        let mut key = extract_key(inner, in_ifindex).ok_or(DropReason::GeneveTruncated)?;
        key.tun_vni = repr.vni;
        key.tun_out_port = meta.egress;
        let dp = self
            .pipeline
            .datapaths
            .get(&repr.vni)
            .ok_or(DropReason::UnknownDatapath)?;
        let mut decision = Decision {
            payload_offset: inner_off,
            flow_hash: flow_hash(&key),
            megaflow: None,
        };
        if meta.egress >= MC_FLOOD_KEY {
            // Multicast group: deliver to every local port of the switch. The sender already
            // replicated to each chassis, so nothing goes back out to the tunnel.
            for (p, iface) in dp.local_ports() {
                if p.key == meta.ingress {
                    continue;
                }
                if let Some(ix) = self.ifindex(iface) {
                    out.push(Output::Local { ifindex: ix });
                }
            }
            return Ok(decision);
        }
        let port = dp.ports.get(&meta.egress).ok_or(DropReason::UnknownPort)?;
        let PortLocation::Local { iface } = &port.location else {
            return Err(DropReason::UnknownPort);
        };
        let ix = self.ifindex(iface).ok_or(DropReason::UnknownPort)?;
        out.push(Output::Local { ifindex: ix });
        let mut mask = FlowKey::zeroed();
        mask.in_ifindex = u32::MAX;
        mask.tun_vni = u32::MAX;
        mask.tun_out_port = u16::MAX;
        decision.megaflow = Some(Megaflow {
            key: key.masked(&mask),
            mask,
            action: FlowAction {
                kind: act::DECAP_OUTPUT,
                out_ifindex: ix,
                dp_key: dp.tunnel_key,
                ..Default::default()
            },
        });
        Ok(decision)
    }
}

/// What `trace` found: the stages a frame passes, and the verdict.
#[derive(Debug, Clone)]
pub struct Trace {
    pub stages: Vec<String>,
    pub outputs: Vec<Output>,
    pub verdict: Result<Decision, DropReason>,
}

/// A megaflow's match, human readable.
pub fn describe_match(k: &FlowKey, mask: &FlowKey) -> String {
    describe_key(k, mask)
}

/// Builds a test frame from a packet description (`geneflowctl trace`): `in_port`, `eth_src`,
/// `eth_dst`, optional `ip_src`, `ip_dst`, `proto` (udp, tcp, icmp), `sport`, `dport`.
pub fn frame_from_spec(v: &serde_json::Value) -> Result<(String, Vec<u8>), String> {
    let s = |k: &str| v[k].as_str().map(str::to_string);
    let in_port = s("in_port").ok_or("trace needs in_port")?;
    let mac = |k: &str| -> Result<[u8; 6], String> {
        s(k).ok_or(format!("trace needs {k}"))?
            .parse::<Mac>()
            .map(|m| m.0)
            .map_err(|e| format!("{k}: {e}"))
    };
    let (src, dst) = (mac("eth_src")?, mac("eth_dst")?);
    let ip = |k: &str| -> Result<Option<[u8; 4]>, String> {
        match s(k) {
            None => Ok(None),
            Some(x) => x
                .parse::<Ipv4Addr>()
                .map(|a| Some(a.octets()))
                .map_err(|_| format!("{k}: bad IPv4 address {x:?}")),
        }
    };
    let mut frame = Vec::new();
    let payload = [0u8; 18];
    match (ip("ip_src")?, ip("ip_dst")?) {
        (Some(a), Some(b)) => {
            let base = etherparse::PacketBuilder::ethernet2(src, dst).ipv4(a, b, 64);
            let sport = v["sport"].as_u64().unwrap_or(40000) as u16;
            let dport = v["dport"].as_u64().unwrap_or(9) as u16;
            let r = match s("proto").as_deref().unwrap_or("udp") {
                "udp" => base.udp(sport, dport).write(&mut frame, &payload),
                "tcp" => base.tcp(sport, dport, 1, 64000).write(&mut frame, &payload),
                "icmp" => base.icmpv4_echo_request(1, 1).write(&mut frame, &payload),
                p => return Err(format!("proto: want udp, tcp or icmp, got {p:?}")),
            };
            r.map_err(|e| e.to_string())?;
        }
        (None, None) => {
            frame.extend_from_slice(&dst);
            frame.extend_from_slice(&src);
            frame.extend_from_slice(&[0x88, 0xb5]);
            frame.resize(60, 0);
        }
        _ => return Err("give both ip_src and ip_dst, or neither".into()),
    }
    Ok((in_port, frame))
}

fn describe_key(k: &FlowKey, mask: &FlowKey) -> String {
    let mut f = Vec::new();
    if mask.in_ifindex != 0 {
        f.push(format!("in_ifindex={}", k.in_ifindex));
    }
    if mask.tun_vni != 0 {
        f.push(format!("tun_vni={}", k.tun_vni));
    }
    if mask.tun_out_port != 0 {
        f.push(format!("tun_egress_key={}", k.tun_out_port));
    }
    if mask.eth_dst != [0; 6] {
        f.push(format!("eth_dst={}", Mac(k.eth_dst)));
    }
    if mask.eth_src != [0; 6] {
        f.push(format!("eth_src={}", Mac(k.eth_src)));
    }
    f.join(",")
}

impl Tables {
    /// Runs the pipeline on `frame` like `process` and says, stage by stage, what it did
    /// (like ovn-trace / ofproto/trace). Sends nothing. `ifname` names an ifindex.
    pub fn trace(&self, frame: &[u8], in_ifindex: u32, ifname: &dyn Fn(u32) -> String) -> Trace {
        let mut st = Vec::new();
        let mut outputs = Vec::new();
        let verdict = self.process(frame, in_ifindex, &mut outputs);
        let key = extract_key(frame, in_ifindex);
        if in_ifindex == self.uplink_ifindex {
            st.push(format!(
                "ingress: uplink {} (Geneve from the underlay)",
                ifname(in_ifindex)
            ));
        } else if let Some(inp) = self.ports.get(&in_ifindex) {
            let dp = self.pipeline.datapaths.get(&inp.dp_key);
            let pname = dp
                .and_then(|d| d.ports.get(&inp.port_key))
                .map(|p| p.name.as_str())
                .unwrap_or("?");
            st.push(format!(
                "ingress: interface {} = logical port {pname} (key {}) on logical switch {} (tunnel key {})",
                ifname(in_ifindex),
                inp.port_key,
                dp.map(|d| d.name.as_str()).unwrap_or("?"),
                inp.dp_key
            ));
            if let (Some(k), Some(d)) = (key, dp) {
                let dst = Mac(k.eth_dst);
                if dst.is_multicast() {
                    st.push(format!("l2 lookup: {dst} is broadcast/multicast: flood to the switch's other local ports and replicate to {} remote chassis", d.remote_chassis.len()));
                } else {
                    match d.macs.get(&dst).and_then(|key| d.ports.get(key)) {
                        Some(p) => {
                            let where_ = match &p.location {
                                PortLocation::Local { iface } => {
                                    format!("local, interface {iface}")
                                }
                                PortLocation::Remote { chassis, encap_ip } => {
                                    format!("remote, on chassis {chassis} ({encap_ip})")
                                }
                                PortLocation::Unbound => "unbound".to_string(),
                            };
                            st.push(format!(
                                "l2 lookup: {dst} -> egress logical port {} (key {}), {where_}",
                                p.name, p.key
                            ));
                        }
                        None => st.push(format!(
                            "l2 lookup: {dst} is not on logical switch {}",
                            d.name
                        )),
                    }
                }
            }
        } else {
            st.push(format!(
                "ingress: interface {} is not a bound port",
                ifname(in_ifindex)
            ));
        }
        for o in &outputs {
            match o {
                Output::Local { ifindex } => st.push(format!("output: to local interface {}", ifname(*ifindex))),
                Output::Tunnel { remote, vni, meta } => st.push(format!(
                    "output: Geneve encapsulation to {remote}: outer {} -> {remote} UDP dst port {GENEVE_PORT}, VNI {vni}, OVN option class 0x0102 type 0x80 ingress key {} egress key {}, out of uplink {}",
                    self.pipeline.encap_ip.map(|i| i.to_string()).unwrap_or_else(|| "?".into()),
                    meta.ingress,
                    meta.egress,
                    ifname(self.uplink_ifindex)
                )),
            }
        }
        match &verdict {
            Ok(d) => {
                if d.payload_offset > 0 {
                    st.push(format!(
                        "decap: {} bytes of outer headers removed",
                        d.payload_offset
                    ));
                }
                match &d.megaflow {
                    Some(m) => st.push(format!(
                        "megaflow: match {} -> action {} (the fast path handles the following packets)",
                        describe_key(&m.key, &m.mask),
                        match m.action.kind {
                            act::OUTPUT => format!("output({})", ifname(m.action.out_ifindex)),
                            act::ENCAP => format!(
                                "encap_geneve(vni={},ovn=0x{:08x}),redirect({})",
                                m.action.vni,
                                m.action.ovn_opt,
                                ifname(m.action.out_ifindex)
                            ),
                            act::DECAP_OUTPUT => format!("decap,output({})", ifname(m.action.out_ifindex)),
                            k => format!("kind {k}"),
                        }
                    )),
                    None => st.push("megaflow: none (handled by the slow path every time)".into()),
                }
            }
            Err(r) => st.push(format!("drop: {r:?}")),
        }
        Trace {
            stages: st,
            outputs,
            verdict,
        }
    }
}

/// Builds the L2-L4 part of the flow key exactly as the XDP program does.
pub fn extract_key(frame: &[u8], in_ifindex: u32) -> Option<FlowKey> {
    let (eth, rest) = Ethernet2Header::from_slice(frame).ok()?;
    let mut k = FlowKey::zeroed();
    k.in_ifindex = in_ifindex;
    k.eth_dst = eth.destination;
    k.eth_src = eth.source;
    k.eth_type = eth.ether_type.0.to_be();
    if eth.ether_type != EtherType::IPV4 || rest.len() < 20 {
        return Some(k);
    }
    let vihl = rest[0];
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Some(k);
    }
    let proto = rest[9];
    let frag = u16::from_be_bytes([rest[6], rest[7]]);
    k.ip_proto = proto;
    k.ip_src = u32::from_ne_bytes([rest[12], rest[13], rest[14], rest[15]]);
    k.ip_dst = u32::from_ne_bytes([rest[16], rest[17], rest[18], rest[19]]);
    if (proto == 6 || proto == 17) && frag & 0x1fff == 0 && rest.len() >= ihl + 4 {
        k.l4_src = u16::from_ne_bytes([rest[ihl], rest[ihl + 1]]);
        k.l4_dst = u16::from_ne_bytes([rest[ihl + 2], rest[ihl + 3]]);
    }
    Some(k)
}

/// Outer header fields of one encapsulation.
#[derive(Debug, Clone, Copy)]
pub struct EncapParams {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub sport: u16,
    pub vni: u32,
    pub meta: OvnMetadata,
    pub udp_csum: bool,
}

impl EncapParams {
    pub fn sport_for(hash: u32) -> u16 {
        udp_source_port(hash)
    }
}

/// Writes `inner` encapsulated in Ethernet/IPv4/UDP/Geneve(+OVN option) into `buf` and returns
/// the frame length, or `None` if `buf` is too small.
pub fn emit_encap(buf: &mut [u8], inner: &[u8], p: &EncapParams) -> Option<usize> {
    let total = inner.len() + ENCAP_OVERHEAD as usize;
    if buf.len() < total {
        return None;
    }
    let opt = p.meta.to_option_bytes();
    let repr = geneve::Repr {
        oam: false,
        critical: true,
        protocol: geneve::PROTO_ETHERNET,
        vni: p.vni,
        options: &opt,
        ovn: Some(p.meta),
    };
    let gnv_len = repr.buffer_len();
    repr.emit(&mut geneve::Packet::new_unchecked(
        &mut buf[42..42 + gnv_len],
    ));
    buf[42 + gnv_len..total].copy_from_slice(inner);
    let udp_payload_len = total - 42;
    let mut ip = Ipv4Header::new(
        (udp_payload_len + 8) as u16,
        64,
        IpNumber::UDP,
        p.src_ip.octets(),
        p.dst_ip.octets(),
    )
    .ok()?;
    ip.dont_fragment = true;
    ip.header_checksum = ip.calc_header_checksum();
    let mut udp = UdpHeader {
        source_port: p.sport,
        destination_port: GENEVE_PORT,
        length: (udp_payload_len + 8) as u16,
        checksum: 0,
    };
    if p.udp_csum {
        udp.checksum = udp.calc_checksum_ipv4(&ip, &buf[42..total]).ok()?;
    }
    let eth = Ethernet2Header {
        source: p.src_mac,
        destination: p.dst_mac,
        ether_type: EtherType::IPV4,
    };
    buf[0..14].copy_from_slice(&eth.to_bytes());
    buf[14..34].copy_from_slice(&ip.to_bytes());
    buf[34..42].copy_from_slice(&udp.to_bytes());
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use geneflow_control::compiler::compile;
    use geneflow_control::model::{Chassis, LogicalPort, LogicalSwitch, NbDocument, DEFAULT_MTU};

    const FRAME_CSUM: &[u8] = include_bytes!("../../tests/fixtures/geneve/frame_ovn_csum.bin");
    const FRAME_NOCSUM: &[u8] = include_bytes!("../../tests/fixtures/geneve/frame_ovn_nocsum.bin");
    const UPLINK: u32 = 2;

    fn params(csum: bool) -> EncapParams {
        EncapParams {
            src_mac: [2, 0, 0xc6, 0x12, 0, 1],
            dst_mac: [2, 0, 0xc6, 0x12, 0, 2],
            src_ip: "198.18.0.1".parse().unwrap(),
            dst_ip: "198.18.0.2".parse().unwrap(),
            sport: 49152,
            vni: 0xabcd,
            meta: OvnMetadata {
                ingress: 5,
                egress: 7,
            },
            udp_csum: csum,
        }
    }

    #[test]
    fn encap_is_byte_exact_with_scapy() {
        let inner = &FRAME_CSUM[58..];
        let mut buf = [0u8; 256];
        let n = emit_encap(&mut buf, inner, &params(true)).unwrap();
        assert_eq!(&buf[..n], FRAME_CSUM);
        let n = emit_encap(&mut buf, inner, &params(false)).unwrap();
        assert_eq!(&buf[..n], FRAME_NOCSUM);
        assert!(emit_encap(&mut buf[..100], inner, &params(true)).is_none());
    }

    /// Chassis "a" (198.18.0.1) hosts p1 (ifindex 10) and p2 (11) on ls (VNI 0xabcd);
    /// chassis "b" hosts p7.
    fn tables() -> Tables {
        let mut d = NbDocument::default();
        for (n, ip) in [("a", "198.18.0.1"), ("b", "198.18.0.2")] {
            d.chassis.insert(
                n.into(),
                Chassis {
                    name: n.into(),
                    encap_ip: ip.parse().unwrap(),
                    version: 0,
                },
            );
        }
        d.switches.insert(
            "ls".into(),
            LogicalSwitch {
                name: "ls".into(),
                tunnel_key: 0xabcd,
                mtu: DEFAULT_MTU,
                tenant: "t".into(),
                version: 0,
            },
        );
        for (n, k, mac, c) in [
            ("p1", 5, [0x0a, 0, 0, 0, 0, 1], "a"),
            ("p2", 6, [0x0a, 0, 0, 0, 0, 3], "a"),
            ("p7", 7, [0x0a, 0, 0, 0, 0, 2], "b"),
        ] {
            d.ports.insert(
                n.into(),
                LogicalPort {
                    name: n.into(),
                    switch: "ls".into(),
                    mac: Mac(mac),
                    ips: vec![],
                    port_key: k,
                    chassis: Some(c.into()),
                    iface: Some(format!("vp-{n}")),
                    security_groups: vec![],
                    port_security: true,
                    allowed_address_pairs: vec![],
                    version: 0,
                },
            );
        }
        let p = Arc::new(compile(&d, "a"));
        Tables::new(p, UPLINK, 1500, true, |n| match n {
            "vp-p1" => Some(10),
            "vp-p2" => Some(11),
            _ => None,
        })
    }

    #[test]
    fn fingerprints_move_only_with_what_megaflows_depend_on() {
        let t = tables();
        let mac = [2, 0, 0, 0, 0, 1];
        let base = t.fingerprints(mac);
        assert_eq!(base.keys().copied().collect::<Vec<_>>(), vec![0xabcd]);
        // Recompiling the same NB, as a restarted agent does, gives the same fingerprints.
        assert_eq!(tables().fingerprints(mac), base);
        // Each input of the actions changes it: a port's interface, the uplink's MAC and MTU,
        // the checksum option, the encap IP.
        let reattached = Tables::new(t.pipeline.clone(), UPLINK, 1500, true, |n| match n {
            "vp-p1" => Some(12),
            "vp-p2" => Some(11),
            _ => None,
        });
        assert_ne!(reattached.fingerprints(mac), base);
        assert_ne!(t.fingerprints([2, 0, 0, 0, 0, 2]), base);
        let other_mtu = Tables::new(t.pipeline.clone(), UPLINK, 9000, true, |n| t.ifindex(n));
        assert_ne!(other_mtu.fingerprints(mac), base);
        let no_csum = Tables::new(t.pipeline.clone(), UPLINK, 1500, false, |n| t.ifindex(n));
        assert_ne!(no_csum.fingerprints(mac), base);
        let mut p = (*t.pipeline).clone();
        p.encap_ip = Some("198.18.0.9".parse().unwrap());
        let moved = Tables::new(Arc::new(p), UPLINK, 1500, true, |n| t.ifindex(n));
        assert_ne!(moved.fingerprints(mac), base);
    }

    #[test]
    fn mangled_frames_never_panic_and_every_verdict_is_counted() {
        // Deterministic sweep standing in for a fuzzer: every truncation and random byte
        // mutations of a valid Geneve frame (uplink) and of its inner frame (VM port).
        let t = tables();
        let mut out = Vec::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // The uplink's Geneve frame, addressed to this chassis and its port p2 (key 6).
        let mut geneve = FRAME_CSUM.to_vec();
        geneve[30..34].copy_from_slice(&[198, 18, 0, 1]);
        geneve[56..58].copy_from_slice(&6u16.to_be_bytes());
        for (base, in_if) in [(geneve, UPLINK), (FRAME_CSUM[58..].to_vec(), 10)] {
            // The sweep starts from frames the pipeline accepts.
            t.process(&base, in_if, &mut out).unwrap();
            for len in 0..=base.len() {
                let _ = t.process(&base[..len], in_if, &mut out);
            }
            for _ in 0..20_000 {
                let mut f = base.clone();
                for _ in 0..1 + rnd() % 4 {
                    let i = (rnd() as usize) % f.len();
                    f[i] = rnd() as u8;
                }
                let len = f.len() - (rnd() as usize % 8).min(f.len());
                match t.process(&f[..len], in_if, &mut out) {
                    Ok(d) => assert!(d.payload_offset <= len),
                    Err(r) => assert!(r.counter() < ctr::COUNT, "{r:?}"),
                }
            }
        }
    }

    fn inner_to(dst: [u8; 6]) -> Vec<u8> {
        let mut f = FRAME_CSUM[58..].to_vec();
        f[0..6].copy_from_slice(&dst);
        f
    }

    #[test]
    fn local_to_remote_encaps_with_megaflow() {
        let t = tables();
        let mut out = Vec::new();
        let d = t.process(&FRAME_CSUM[58..], 10, &mut out).unwrap();
        assert_eq!(
            out,
            vec![Output::Tunnel {
                remote: "198.18.0.2".parse().unwrap(),
                vni: 0xabcd,
                meta: OvnMetadata {
                    ingress: 5,
                    egress: 7
                }
            }]
        );
        let m = d.megaflow.unwrap();
        assert_eq!(m.action.kind, act::ENCAP);
        assert_eq!(m.action.ovn_opt, 0x0005_0007);
        assert_eq!(m.action.out_ifindex, UPLINK);
        assert_eq!(m.action.max_inner_len, 1456);
        // The megaflow is wide: it matches on in-port and destination MAC only.
        assert_eq!(m.key.ip_src, 0);
        assert_eq!(m.key.eth_dst, [0x0a, 0, 0, 0, 0, 2]);
        assert_eq!(m.key.in_ifindex, 10);
    }

    #[test]
    fn local_to_local_outputs() {
        let t = tables();
        let mut out = Vec::new();
        let d = t
            .process(&inner_to([0x0a, 0, 0, 0, 0, 3]), 10, &mut out)
            .unwrap();
        assert_eq!(out, vec![Output::Local { ifindex: 11 }]);
        assert_eq!(d.megaflow.unwrap().action.kind, act::OUTPUT);
    }

    #[test]
    fn broadcast_floods_locally_and_replicates() {
        let t = tables();
        let mut out = Vec::new();
        let d = t.process(&inner_to([0xff; 6]), 10, &mut out).unwrap();
        assert!(d.megaflow.is_none());
        assert_eq!(out.len(), 2);
        assert!(out.contains(&Output::Local { ifindex: 11 }));
        assert!(out
            .iter()
            .any(|o| matches!(o, Output::Tunnel { meta, .. } if meta.egress == MC_FLOOD_KEY)));
    }

    #[test]
    fn unknown_destination_and_port_drop() {
        let t = tables();
        let mut out = Vec::new();
        assert_eq!(
            t.process(&inner_to([0x0a, 0, 0, 0, 0, 0x99]), 10, &mut out),
            Err(DropReason::NoDestination)
        );
        assert_eq!(
            t.process(&FRAME_CSUM[58..], 99, &mut out),
            Err(DropReason::UnknownInPort)
        );
        assert_eq!(
            t.process(&[0u8; 5], 10, &mut out),
            Err(DropReason::Malformed)
        );
    }

    #[test]
    fn tunnel_to_local_decaps() {
        let t = tables();
        // The scapy frame is addressed to 198.18.0.2; chassis b's view receives it.
        let mut f = FRAME_CSUM.to_vec();
        // Re-address to a (198.18.0.1) and egress port p2 (key 6).
        f[30..34].copy_from_slice(&[198, 18, 0, 1]);
        f[56..58].copy_from_slice(&6u16.to_be_bytes());
        let mut out = Vec::new();
        let d = t.process(&f, UPLINK, &mut out).unwrap();
        assert_eq!(out, vec![Output::Local { ifindex: 11 }]);
        assert_eq!(d.payload_offset, 58);
        let m = d.megaflow.unwrap();
        assert_eq!(m.action.kind, act::DECAP_OUTPUT);
        assert_eq!((m.key.tun_vni, m.key.tun_out_port), (0xabcd, 6));
        // Unknown egress key and unknown VNI are counted drops.
        f[56..58].copy_from_slice(&77u16.to_be_bytes());
        assert_eq!(
            t.process(&f, UPLINK, &mut out),
            Err(DropReason::UnknownPort)
        );
        f[47] = 0x99;
        assert_eq!(
            t.process(&f, UPLINK, &mut out),
            Err(DropReason::UnknownDatapath)
        );
    }

    #[test]
    fn malformed_tunnel_frames_map_to_reasons() {
        let t = tables();
        let mut base = FRAME_CSUM.to_vec();
        base[30..34].copy_from_slice(&[198, 18, 0, 1]);
        let mut out = Vec::new();
        let mut v1 = base.clone();
        v1[42] |= 0x40;
        assert_eq!(
            t.process(&v1, UPLINK, &mut out),
            Err(DropReason::GeneveVersion)
        );
        let mut crit = base.clone();
        crit[50..52].copy_from_slice(&0xffffu16.to_be_bytes());
        assert_eq!(
            t.process(&crit, UPLINK, &mut out),
            Err(DropReason::GeneveCriticalOpt)
        );
        let mut optlen = base.clone();
        optlen[53] = 3;
        assert_eq!(
            t.process(&optlen, UPLINK, &mut out),
            Err(DropReason::GeneveOptLen)
        );
        assert_eq!(
            t.process(&base[..46], UPLINK, &mut out),
            Err(DropReason::GeneveTruncated)
        );
    }

    #[test]
    fn key_extraction_matches_layout() {
        let k = extract_key(&FRAME_CSUM[58..], 3).unwrap();
        assert_eq!(k.eth_type, 0x0800u16.to_be());
        assert_eq!(k.ip_src, u32::from_ne_bytes([10, 0, 0, 1]));
        assert_eq!(k.l4_dst, 5678u16.to_be());
        assert_eq!(k.ip_proto, 17);
    }
}
