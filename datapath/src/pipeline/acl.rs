//! ACLs: the security-group rules of a port (`geneflow_control::acl`), egress rules on the
//! sending chassis (from-lport) and ingress rules on the delivering one (to-lport), so no
//! chassis trusts another's verdict about its own VMs. Conntrack first, like Cilium and OVN:
//! a packet of an established connection, either way, passes without the rules; a new one
//! must be allowed by a rule, and is then committed in the zone(s) of the check, so that its
//! later packets and its replies are established. Ports without groups have no ACL. Only IPv4
//! is filtered (ARP is port security's business).

use super::key::key_ip;
use super::{DropReason, Run};
use geneflow_abi::ct;
use geneflow_control::acl::PortAcl;
use geneflow_control::compiler::Datapath;
use geneflow_control::model::Direction;

const ETH_P_IPV4: u16 = 0x0800;

/// From-lport ACL (the sending VM's egress rules).
pub(super) fn from_lport(r: &mut Run, dp: &Datapath, port: u16) -> Result<(), DropReason> {
    const STAGE: &str = "acl (from-lport)";
    match dp.ports.get(&port).and_then(|p| p.acl.as_ref()) {
        None => {
            r.note(STAGE, || "no security groups: allowed".into());
            Ok(())
        }
        Some(acl) => check(r, acl, Direction::Egress, dp.tunnel_key, STAGE),
    }
}

/// To-lport ACL (the receiving VM's ingress rules), for a port bound to this chassis.
pub(super) fn to_lport(r: &mut Run, dp: &Datapath, port: u16) -> Result<(), DropReason> {
    const STAGE: &str = "acl (to-lport)";
    match dp.ports.get(&port).and_then(|p| p.acl.as_ref()) {
        None => {
            r.note(STAGE, || "no security groups: allowed".into());
            Ok(())
        }
        Some(acl) => {
            // After a floating IP's translation the VM sees the translated packet: that is
            // what is committed (XDP looks such frames up translated too, see `FIP_CT`).
            let zone = if r.nat_src.is_some() || r.nat_dst.is_some() {
                dp.tunnel_key | ct::POST_NAT
            } else {
                dp.tunnel_key
            };
            check(r, acl, Direction::Ingress, zone, STAGE)
        }
    }
}

fn check(
    r: &mut Run,
    acl: &PortAcl,
    dir: Direction,
    zone: u32,
    stage: &str,
) -> Result<(), DropReason> {
    r.mask.eth_type = u16::MAX;
    if u16::from_be(r.key.eth_type) != ETH_P_IPV4 {
        r.note(stage, || "not IPv4: allowed".into());
        return Ok(());
    }
    r.mask.ct_state = u8::MAX;
    let state = r.key.ct_state;
    if state & (ct::EST | ct::RELATED) != 0 {
        r.note(stage, || {
            if state & ct::RELATED != 0 {
                "ICMP error about a tracked connection (related): allowed".into()
            } else if state & ct::REPLY != 0 {
                "reply of an established connection: allowed".into()
            } else {
                "established connection: allowed".into()
            }
        });
        return Ok(());
    }
    r.mask.ip_proto = u8::MAX;
    let (proto, dport) = (r.key.ip_proto, u16::from_be(r.key.l4_dst));
    // The remote end as the VM sees it: after a floating IP's translation, the translated
    // source (the rules match what the VM sees; the source is in the mask either way).
    let remote = match dir {
        Direction::Ingress => r.nat_src.unwrap_or(key_ip(r.key.ip_src)),
        Direction::Egress => key_ip(r.key.ip_dst),
    };
    for rule in acl.rules(dir) {
        if rule.reads_port() {
            r.mask.l4_dst = u16::MAX;
        }
        if rule.reads_remote() {
            match dir {
                Direction::Ingress => r.mask.ip_src = u32::MAX,
                Direction::Egress => r.mask.ip_dst = u32::MAX,
            }
        }
        if rule.allows(proto, dport, remote) {
            r.note(stage, || {
                format!(
                    "new connection, allowed by {}: committed in zone {zone}",
                    rule.id
                )
            });
            r.commit(zone);
            return Ok(());
        }
    }
    r.note(stage, || {
        format!("new connection (protocol {proto}, port {dport}, remote {remote}): no rule allows it, dropped")
    });
    Err(DropReason::Acl)
}
