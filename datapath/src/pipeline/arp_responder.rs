//! ARP responder (Dragonflow's `l2_responder`, OVN's ls_in_arp_rsp): an ARP request for the
//! address of any logical port or router port of the same switch is answered by this chassis
//! with the owner's MAC, in XDP after the first (`act::ARP_REPLY`). Not answered: gratuitous
//! ARP, replies, addresses not on the switch (they are switched as usual), and requests from
//! the owner itself (its own duplicate-address probe). Malformed ARP is dropped, counted.

use super::key::key_ip;
use super::{AnswerKind, Decision, DropReason, Output, Run};
use etherparse::{EtherType, Ethernet2Header};
use geneflow_abi::{act, arp, FlowAction};
use geneflow_control::compiler::Datapath;
use geneflow_control::model::Mac;
use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetAddress};

pub(super) fn run(
    r: &mut Run,
    dp: &Datapath,
    in_key: u16,
    out: &mut Vec<Output>,
    buf: &mut Vec<u8>,
) -> Result<Option<Decision>, DropReason> {
    r.mask.eth_type = u16::MAX;
    if r.key.eth_type != EtherType::ARP.0.to_be() {
        return Ok(None);
    }
    r.mask.ip_proto = u8::MAX;
    match r.key.ip_proto & !arp::SHA_MISMATCH {
        0 => {
            r.note("arp responder", || "malformed ARP: dropped".into());
            return Err(DropReason::MalformedArp);
        }
        arp::OP_REQUEST => {}
        op => {
            r.note("arp responder", || {
                if op & arp::GRATUITOUS != 0 {
                    "gratuitous ARP: not answered, switched".into()
                } else {
                    "ARP reply: switched".into()
                }
            });
            return Ok(None);
        }
    }
    r.mask.ip_dst = u32::MAX;
    let tpa = key_ip(r.key.ip_dst);
    let Some(owner) = dp.ips.get(&tpa) else {
        r.note("arp responder", || {
            format!("{tpa} is not an address on switch {}: switched", dp.name)
        });
        return Ok(None);
    };
    if owner.key == in_key {
        r.note("arp responder", || {
            format!("the requester owns {tpa}: not answered")
        });
        return Ok(None);
    }
    r.note("arp responder", || {
        format!(
            "{tpa} is at {} (port key {}): answered",
            owner.mac, owner.key
        )
    });
    reply(r, owner.mac, dp.tunnel_key, out, buf).map(Some)
}

/// Answers the ARP request in `r.frame` with "target is at `mac`", back out of the port it came
/// in on, and the megaflow that makes XDP answer the next ones (`act::ARP_REPLY`).
pub(super) fn reply(
    r: &mut Run,
    mac: Mac,
    dp_key: u32,
    out: &mut Vec<Output>,
    buf: &mut Vec<u8>,
) -> Result<Decision, DropReason> {
    // The reply, as the fast path writes it: back to the requester's Ethernet source.
    let (eth, payload) =
        Ethernet2Header::from_slice(r.frame).map_err(|_| DropReason::MalformedArp)?;
    let req = ArpPacket::new_checked(payload)
        .ok()
        .and_then(|p| ArpRepr::parse(&p).ok())
        .ok_or(DropReason::MalformedArp)?;
    let ArpRepr::EthernetIpv4 {
        source_hardware_addr,
        source_protocol_addr,
        target_protocol_addr,
        ..
    } = req
    else {
        return Err(DropReason::MalformedArp);
    };
    let answer = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: EthernetAddress(mac.0),
        source_protocol_addr: target_protocol_addr,
        target_hardware_addr: source_hardware_addr,
        target_protocol_addr: source_protocol_addr,
    };
    buf.clear();
    buf.extend_from_slice(
        &Ethernet2Header {
            destination: eth.source,
            source: mac.0,
            ether_type: EtherType::ARP,
        }
        .to_bytes(),
    );
    buf.resize(14 + answer.buffer_len(), 0);
    answer.emit(&mut ArpPacket::new_unchecked(&mut buf[14..]));
    let back = r.back_out();
    let vlan = match back {
        Output::Provider { vlan, .. } => vlan,
        _ => 0,
    };
    out.push(back);
    let mut d = r.answered(AnswerKind::ArpReply, source_protocol_addr);
    d.megaflow = Some(r.megaflow(FlowAction {
        kind: act::ARP_REPLY,
        out_ifindex: r.in_ifindex,
        dp_key,
        set_smac: mac.0,
        vlan,
        ..Default::default()
    }));
    Ok(d)
}
