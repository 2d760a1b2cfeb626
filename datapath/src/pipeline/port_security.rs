//! Port security (OVN's ls_in_port_sec_l2/ip/nd): a frame from a VM port must come from an
//! address the port owns (`geneflow_control::port_security`): its MAC, and for IPv4 and ARP
//! one of its addresses or allowed address pairs. ARP must carry the Ethernet source as its
//! sender MAC. DHCP client traffic (source 0.0.0.0, UDP 68 -> 67 broadcast) and ARP probes
//! (sender address 0.0.0.0, RFC 5227) are allowed; IPv6 is dropped (the model has no IPv6
//! addresses yet). Other ethertypes pass on the MAC check. The fields consulted go into the
//! megaflow mask, so spoofed traffic is dropped in XDP after its first frame, counted per
//! reason.

use super::key::key_ip;
use super::{DropReason, Run};
use geneflow_abi::arp;
use geneflow_control::compiler::Datapath;
use geneflow_control::model::Mac;
use std::net::Ipv4Addr;

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const STAGE: &str = "port security (in)";

/// 802.1Q (0x8100), 802.1ad (0x88a8) and the old QinQ ethertype (0x9100).
const VLAN_TPIDS: [u16; 3] = [0x8100, 0x88a8, 0x9100];

/// Logical switch ingress: checks the source of a frame from a VM port. A VLAN-tagged frame
/// is refused on a provider network whatever the port's settings, as an access port does (it
/// would reach the VLAN the VM chose), and where port security checks addresses (its
/// addresses could not be checked); on an overlay switch without address checks a VM may
/// trunk VLANs to its peers.
pub(super) fn ingress(r: &mut Run, dp: &Datapath, port: u16) -> Result<(), DropReason> {
    r.mask.eth_type = u16::MAX;
    if VLAN_TPIDS.contains(&u16::from_be(r.key.eth_type)) {
        let checks_ip = dp
            .ports
            .get(&port)
            .and_then(|p| p.security.as_ref())
            .is_some_and(|s| s.checks_ip());
        if dp.provider.is_some() || checks_ip {
            r.note(STAGE, || "VLAN-tagged frame from a VM: dropped".into());
            return Err(DropReason::VlanTagged);
        }
    }
    let Some(sec) = dp.ports.get(&port).and_then(|p| p.security.as_ref()) else {
        r.note(STAGE, || "off on this port: any source".into());
        return Ok(());
    };
    r.mask.eth_src = [0xff; 6];
    let mac = Mac(r.key.eth_src);
    if !sec.mac_allowed(mac) {
        r.note(STAGE, || {
            format!(
                "source MAC {mac} is not the port's ({}): dropped",
                sec.describe()
            )
        });
        return Err(DropReason::SpoofedMac);
    }
    r.mask.eth_type = u16::MAX;
    let ethertype = u16::from_be(r.key.eth_type);
    if !sec.checks_ip() && ethertype != ETH_P_IPV6 {
        r.note(STAGE, || {
            format!("{mac}: the port's (checked on its MAC only)")
        });
        return Ok(());
    }
    match ethertype {
        ETH_P_IPV4 => {
            r.mask.ip_src = u32::MAX;
            let src = key_ip(r.key.ip_src);
            if sec.ip_allowed(mac, src) {
                r.note(STAGE, || format!("{mac} {src}: the port's, allowed"));
                Ok(())
            } else if src.is_unspecified() && dhcp_client(r) {
                r.note(STAGE, || "DHCP client from 0.0.0.0: allowed".into());
                Ok(())
            } else {
                r.note(STAGE, || {
                    format!(
                        "IPv4 source {src} is not the port's ({}): dropped",
                        sec.describe()
                    )
                });
                Err(DropReason::SpoofedIp)
            }
        }
        ETH_P_ARP => {
            r.mask.ip_proto = u8::MAX;
            r.mask.ip_src = u32::MAX;
            if r.key.ip_proto == 0 {
                r.note(STAGE, || "malformed ARP: dropped".into());
                return Err(DropReason::MalformedArp);
            }
            if r.key.ip_proto & arp::SHA_MISMATCH != 0 {
                r.note(STAGE, || {
                    "ARP sender MAC differs from the Ethernet source: dropped".into()
                });
                return Err(DropReason::SpoofedArp);
            }
            let spa = key_ip(r.key.ip_src);
            if spa.is_unspecified() || sec.ip_allowed(mac, spa) {
                r.note(STAGE, || format!("ARP from {mac} {spa}: allowed"));
                Ok(())
            } else {
                r.note(STAGE, || {
                    format!(
                        "ARP sender {spa} is not the port's ({}): dropped",
                        sec.describe()
                    )
                });
                Err(DropReason::SpoofedArp)
            }
        }
        ETH_P_IPV6 => {
            r.note(STAGE, || {
                "IPv6 from a port without IPv6 addresses: dropped".into()
            });
            Err(DropReason::Ipv6NotAllowed)
        }
        t => {
            r.note(STAGE, || format!("ethertype {t:#06x} from {mac}: allowed"));
            Ok(())
        }
    }
}

/// A DHCP client's broadcast (DISCOVER, REQUEST before it has an address).
fn dhcp_client(r: &mut Run) -> bool {
    r.mask.ip_proto = u8::MAX;
    r.mask.ip_dst = u32::MAX;
    r.mask.l4_src = u16::MAX;
    r.mask.l4_dst = u16::MAX;
    r.key.ip_proto == 17
        && key_ip(r.key.ip_dst) == Ipv4Addr::BROADCAST
        && u16::from_be(r.key.l4_src) == 68
        && u16::from_be(r.key.l4_dst) == 67
}

/// Logical switch egress: before delivery to a VM port. Delivery follows the L2 lookup (the
/// destination MAC); there is no address filter on the way out.
pub(super) fn egress(r: &mut Run, _dp: &Datapath, _port: u16) -> Result<(), DropReason> {
    r.note("port security (out)", || {
        "delivery by destination MAC; no address filter".into()
    });
    Ok(())
}
