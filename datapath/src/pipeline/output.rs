//! Output to a logical port: its local interface, or a Geneve tunnel to the chassis hosting it
//! (VNI = the port's switch, OVN option = ingress and egress port keys). Builds the megaflow
//! action the fast path runs for the packets that follow.

use super::{Decision, DropReason, Output, Run};
use crate::wire::geneve::OvnMetadata;
use geneflow_abi::{act, flag, FlowAction};
use geneflow_control::compiler::{CompiledPort, Datapath, PortLocation};
use geneflow_control::model::Mac;

/// The rewrite a router applied: the fast path repeats it (`flag::ROUTE`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Routed {
    pub smac: Mac,
    pub dmac: Mac,
}

/// Sends the frame to `port` of `dp`, entering from logical port `ingress_key`.
pub(super) fn to_port(
    r: &mut Run,
    dp: &Datapath,
    ingress_key: u16,
    port: &CompiledPort,
    out: &mut Vec<Output>,
    routed: Option<Routed>,
) -> Result<Decision, DropReason> {
    let mut action = FlowAction {
        dp_key: dp.tunnel_key,
        ..Default::default()
    };
    if let Some(rt) = routed {
        action.flags |= flag::ROUTE;
        action.set_smac = rt.smac.0;
        action.set_dmac = rt.dmac.0;
    }
    match &port.location {
        PortLocation::Local { iface } => {
            let ix = r.t.ifindex(iface).ok_or(DropReason::NoDestination)?;
            if ix == r.in_ifindex && routed.is_none() {
                r.note("output", || "back to the port it came from: dropped".into());
                return Err(DropReason::NoDestination);
            }
            super::acl::to_lport(r, dp, port.key)?;
            out.push(Output::Local { ifindex: ix });
            action.kind = act::OUTPUT;
            action.out_ifindex = ix;
            r.note("output", || format!("to local interface {iface}"));
        }
        PortLocation::Remote { chassis, .. } if dp.provider.is_some() => {
            // On a provider network the other chassis' ports are reached through it.
            let o =
                r.t.provider_output(dp.tunnel_key)
                    .ok_or(DropReason::NoDestination)?;
            if let Output::Provider { ifindex, vlan } = o {
                action.out_ifindex = ifindex;
                action.vlan = vlan;
            }
            out.push(o);
            action.kind = act::OUTPUT;
            r.note("output", || {
                format!(
                    "to the physical network (port {} is on chassis {chassis})",
                    port.name
                )
            });
        }
        PortLocation::Remote { encap_ip, chassis } => {
            let local = r.t.pipeline.encap_ip.ok_or(DropReason::NoDestination)?;
            let (len, max) = (r.frame.len(), r.t.max_inner_len());
            if routed.is_none() && len as u32 > max {
                r.note("output", || {
                    format!("{len} bytes exceed the {max} the overlay carries: dropped")
                });
                return Err(DropReason::TooBig);
            }
            let meta = OvnMetadata {
                ingress: ingress_key,
                egress: port.key,
            };
            out.push(Output::Tunnel {
                remote: *encap_ip,
                vni: dp.tunnel_key,
                meta,
            });
            action.kind = act::ENCAP;
            action.out_ifindex = r.t.uplink_ifindex;
            action.encap_src = u32::from_ne_bytes(local.octets());
            action.encap_dst = u32::from_ne_bytes(encap_ip.octets());
            action.vni = dp.tunnel_key;
            action.ovn_opt = meta.value();
            action.max_inner_len = r.t.max_inner_len();
            if r.t.udp_csum {
                action.flags |= flag::UDP_CSUM;
            }
            r.note("output", || {
                format!(
                    "Geneve to chassis {chassis} ({encap_ip}): VNI {}, OVN option ingress key {ingress_key} egress key {}",
                    dp.tunnel_key, port.key
                )
            });
        }
        PortLocation::Unbound => {
            r.note("output", || {
                format!("port {} is not bound: dropped", port.name)
            });
            return Err(DropReason::NoDestination);
        }
    }
    let mut d = r.decision(0);
    d.megaflow = Some(r.megaflow(r.with_commit(action)));
    Ok(d)
}
