//! `geneflowctl trace`: runs a described packet through the pipeline without sending it and
//! says what every stage decided, like ovn-trace.

use super::key::{describe_action, describe_match};
use super::{Decision, DropReason, Output, Tables};
use geneflow_abi::GENEVE_PORT;
use geneflow_control::model::Mac;
use std::net::Ipv4Addr;

/// What `trace` found: the stages a frame passes, and the verdict.
#[derive(Debug, Clone)]
pub struct Trace {
    pub stages: Vec<String>,
    pub outputs: Vec<Output>,
    pub verdict: Result<Decision, DropReason>,
}

/// Builds a test frame from a packet description (`geneflowctl trace`): `in_port`, `eth_src`,
/// `eth_dst`, optional `ip_src`, `ip_dst`, `proto` (udp, tcp, icmp, arp: an ARP request from
/// `ip_src` for `ip_dst`), `sport`, `dport`, `ttl`.
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
            if s("proto").as_deref() == Some("arp") {
                frame.extend_from_slice(&dst);
                frame.extend_from_slice(&src);
                frame.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
                frame.extend_from_slice(&src);
                frame.extend_from_slice(&a);
                frame.extend_from_slice(&[0; 6]);
                frame.extend_from_slice(&b);
                return Ok((in_port, frame));
            }
            let ttl = v["ttl"].as_u64().unwrap_or(64);
            let ttl = u8::try_from(ttl).map_err(|_| format!("ttl: {ttl} is not 0..255"))?;
            let base = etherparse::PacketBuilder::ethernet2(src, dst).ipv4(a, b, ttl);
            let sport = v["sport"].as_u64().unwrap_or(40000) as u16;
            let dport = v["dport"].as_u64().unwrap_or(9) as u16;
            let r = match s("proto").as_deref().unwrap_or("udp") {
                "udp" => base.udp(sport, dport).write(&mut frame, &payload),
                "tcp" => base.tcp(sport, dport, 1, 64000).write(&mut frame, &payload),
                "icmp" => base.icmpv4_echo_request(1, 1).write(&mut frame, &payload),
                p => return Err(format!("proto: want udp, tcp, icmp or arp, got {p:?}")),
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

/// The control socket's answer to `trace` (`arg`: the packet description of
/// `frame_from_spec`, and `vlan` for a provider network): where the frame comes in is the
/// uplink, a port bound here (by logical port or interface), or what `other` finds (a
/// provider network).
pub fn trace_answer(
    tables: &Tables,
    arg: &serde_json::Value,
    other: &dyn Fn(&str) -> Option<u32>,
    ifname: &dyn Fn(u32) -> String,
) -> serde_json::Value {
    use serde_json::json;
    let (in_port, frame) = match frame_from_spec(arg) {
        Err(e) => return json!({ "error": e }),
        Ok(x) => x,
    };
    let ix = if in_port == "uplink" {
        Some(tables.uplink_ifindex)
    } else {
        other(&in_port).or_else(|| {
            tables
                .pipeline
                .bindings
                .values()
                .find(|b| b.port == in_port || b.iface == in_port)
                .and_then(|b| tables.ifindex(&b.iface))
        })
    };
    let vlan = arg["vlan"]
        .as_u64()
        .filter(|v| (1..=4094).contains(v))
        .map(|v| geneflow_abi::VLAN_PRESENT | v as u16)
        .unwrap_or(0);
    let Some(ix) = ix else {
        return json!({ "error": format!("{in_port:?} is not a port bound on this chassis") });
    };
    let t = tables.trace(&frame, (ix, vlan), ifname);
    json!({
        "stages": t.stages,
        "outputs": t.outputs.iter().map(|o| format!("{o:?}")).collect::<Vec<_>>(),
        "verdict": match &t.verdict {
            Ok(_) => "forward".to_string(),
            Err(r) => format!("drop: {r:?}"),
        },
    })
}

impl Tables {
    /// Runs the pipeline on `frame` like `process` and says, stage by stage, what it did
    /// (like ovn-trace / ofproto/trace). Sends nothing. `ifname` names an ifindex.
    /// `vlan`: for a provider interface, the VLAN the frame comes on (`VLAN_PRESENT | vid`),
    /// or 0.
    pub fn trace(
        &self,
        frame: &[u8],
        (in_ifindex, vlan): (u32, u16),
        ifname: &dyn Fn(u32) -> String,
    ) -> Trace {
        let mut st = Vec::new();
        let mut outputs = Vec::new();
        let mut buf = Vec::new();
        if in_ifindex == self.uplink_ifindex {
            st.push(format!(
                "ingress: uplink {} (Geneve from the underlay)",
                ifname(in_ifindex)
            ));
        } else if self.is_provider(in_ifindex) {
            st.push(format!(
                "ingress: provider interface {}{}",
                ifname(in_ifindex),
                if vlan == 0 {
                    String::new()
                } else {
                    format!(", VLAN {}", vlan & 0x0fff)
                }
            ));
        } else if !self.ports.contains_key(&in_ifindex) {
            st.push(format!(
                "ingress: interface {} is not a bound port",
                ifname(in_ifindex)
            ));
        }
        let verdict = self.run(
            frame,
            (in_ifindex, vlan),
            &mut outputs,
            &mut buf,
            Some(&mut st),
        );
        for o in &outputs {
            match o {
                Output::Local { ifindex } => st.push(format!("transmit: on local interface {}", ifname(*ifindex))),
                Output::Provider { ifindex, vlan } => st.push(format!(
                    "transmit: on provider interface {}{}",
                    ifname(*ifindex),
                    if *vlan == 0 { String::new() } else { format!(", VLAN {}", vlan & 0x0fff) }
                )),
                Output::Tunnel { remote, vni, meta } => st.push(format!(
                    "transmit: Geneve encapsulation to {remote}: outer {} -> {remote} UDP dst port {GENEVE_PORT}, VNI {vni}, OVN option class 0x0102 type 0x80 ingress key {} egress key {}, out of uplink {}",
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
                if let Some(a) = &d.answer {
                    st.push(format!("answer: {:?} to {}", a.kind, a.source));
                }
                match &d.megaflow {
                    Some(m) => {
                        let action = describe_action(&m.action, ifname, false);
                        st.push(format!(
                            "megaflow: match {} -> action {action} (the fast path handles the following packets)",
                            describe_match(&m.key, &m.mask)
                        ));
                    }
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
