//! DHCP responder (Dragonflow's `dhcp_app`, OVN's ls_in_dhcp_options/response): a VM's DHCP
//! request is answered by its own chassis, from the lease the compiler built for the port
//! (`geneflow_control::dhcp`), and never crosses the overlay. Slow path only: the XDP program
//! hands every UDP 67/68 frame from a VM port here before any megaflow lookup, so the megaflows
//! of other traffic need not consult the UDP ports, and the forwarder rate limits the answers
//! per port.
//!
//! DISCOVER -> OFFER; REQUEST (selecting, init-reboot, renewing, rebinding) -> ACK for the
//! port's address, NAK for any other; INFORM -> ACK without an address or lease; RELEASE and
//! DECLINE are taken (the address is the port's, nothing to free). A request naming another
//! server is not ours: not answered. The stage runs before the ACL, as DHCP to the local
//! server is always allowed (Neutron adds the same exception). A port without a lease has its
//! DHCP switched as usual (a tenant may run its own server), except that a DHCP *server*
//! answer from a port with port security on is dropped: a VM may not pose as a server.

use super::key::key_ip;
use super::{AnswerKind, Decision, DropReason, Output, Run};
use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv4HeaderSlice, UdpHeader};
use geneflow_control::compiler::Datapath;
use geneflow_control::dhcp::{opt, DhcpLease};
use smoltcp::wire::{
    DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress, Ipv4Address,
};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
const STAGE: &str = "dhcp";
/// Room for the options of one answer: the lease's plus the MTU.
const MAX_OPTIONS: usize = 24;
/// What every DHCP client must accept (RFC 2131 2: 576-byte IP datagrams).
const MIN_MAX_SIZE: usize = 576;
const HEADERS: usize = 14 + 20 + 8;
const BOOTP_MIN: usize = 300;

pub(super) fn run(
    r: &mut Run,
    dp: &Datapath,
    port: u16,
    out: &mut Vec<Output>,
    buf: &mut Vec<u8>,
) -> Result<Option<Decision>, DropReason> {
    // `None`: not DHCP to or from a server, the next stages decide. `Some`: answered, or
    // taken with no outputs.
    // Only UDP 67/68 gets here from XDP unless the frame missed anyway; the megaflow of a
    // frame that is not DHCP needs no field from this stage (XDP never looks DHCP up).
    let udp = r.key.eth_type == EtherType::IPV4.0.to_be() && r.key.ip_proto == 17;
    let (sport, dport) = (u16::from_be(r.key.l4_src), u16::from_be(r.key.l4_dst));
    let Some(p) = dp.ports.get(&port) else {
        return Ok(None);
    };
    if udp && sport == SERVER_PORT && dport == CLIENT_PORT {
        if p.security.is_some() {
            r.note(STAGE, || {
                "a DHCP server answer from a VM with port security: dropped".into()
            });
            return Err(DropReason::DhcpServer);
        }
        return Ok(None);
    }
    if !udp || dport != SERVER_PORT {
        r.note(STAGE, || "not DHCP".into());
        return Ok(None);
    }
    let Some(lease) = p.dhcp.as_deref() else {
        r.note(STAGE, || {
            "DHCP request, no DHCP on the port's subnet: switched as usual".into()
        });
        return Ok(None);
    };
    answer(r, lease, out, buf).map(Some)
}

fn malformed(r: &mut Run, why: &'static str) -> DropReason {
    r.note(STAGE, || format!("malformed request ({why}): dropped"));
    DropReason::DhcpMalformed
}

fn answer(
    r: &mut Run,
    lease: &DhcpLease,
    out: &mut Vec<Output>,
    buf: &mut Vec<u8>,
) -> Result<Decision, DropReason> {
    let frame = r.frame;
    let (eth, rest) = Ethernet2Header::from_slice(frame).map_err(|_| malformed(r, "Ethernet"))?;
    let ip = Ipv4HeaderSlice::from_slice(rest).map_err(|_| malformed(r, "IPv4 header"))?;
    if ip.is_fragmenting_payload() {
        return Err(malformed(r, "fragment"));
    }
    let l4 = rest
        .get(ip.slice().len()..usize::from(ip.total_len()))
        .ok_or_else(|| malformed(r, "IPv4 length"))?;
    let udp = etherparse::UdpSlice::from_slice(l4).map_err(|_| malformed(r, "UDP header"))?;
    let packet = DhcpPacket::new_checked(udp.payload()).map_err(|_| malformed(r, "short"))?;
    let req = DhcpRepr::parse(&packet).map_err(|_| malformed(r, "header or options"))?;
    let client = key_ip(r.key.ip_src);
    if !req.relay_agent_ip.is_unspecified() {
        // A relay's message (giaddr set) on a VM port: this server answers its own ports only.
        r.note(STAGE, || {
            "relayed request (giaddr set): not answered".into()
        });
        return Ok(r.decision(0)); // taken, not answered
    }
    let ours = lease.server_id;
    let yours = lease.ip;
    let (kind, your_ip, with_lease) = match req.message_type {
        DhcpMessageType::Discover => (DhcpMessageType::Offer, yours, true),
        DhcpMessageType::Request => {
            if req.server_identifier.is_some_and(|s| s != ours) {
                r.note(STAGE, || {
                    "REQUEST for another server's offer: not answered".into()
                });
                return Ok(r.decision(0)); // taken, not answered
            }
            // Selecting / init-reboot name the address in option 50; renewing and rebinding
            // clients hold it in ciaddr.
            let asked = req.requested_ip.unwrap_or(req.client_ip);
            if asked == yours {
                (DhcpMessageType::Ack, yours, true)
            } else {
                r.note(STAGE, || {
                    format!("REQUEST for {asked}, the port's address is {yours}: NAK")
                });
                (DhcpMessageType::Nak, Ipv4Address::UNSPECIFIED, false)
            }
        }
        DhcpMessageType::Inform => (DhcpMessageType::Ack, Ipv4Address::UNSPECIFIED, false),
        DhcpMessageType::Release | DhcpMessageType::Decline => {
            r.note(STAGE, || {
                format!(
                    "{:?} from {client}: taken, nothing to free",
                    req.message_type
                )
            });
            return Ok(r.decision(0)); // taken, not answered
        }
        _ => return Err(malformed(r, "not a client message")),
    };
    let nak = kind == DhcpMessageType::Nak;
    // The MTU the overlay carries on this chassis, less the inner Ethernet header.
    let mtu = lease.mtu.min(r.t.max_inner_len() - 14) as u16;
    let mtu_bytes = mtu.to_be_bytes();
    let lease_bytes = lease.lease_time.to_be_bytes();
    let mut opts = [DhcpOption { kind: 0, data: &[] }; MAX_OPTIONS];
    let mut n = 0;
    // Room left for options in what the client accepts (its option 57, at least 576 bytes).
    let limit = usize::from(req.max_size.unwrap_or(0)).max(MIN_MAX_SIZE) - 28;
    let mut base = DhcpRepr {
        message_type: kind,
        transaction_id: req.transaction_id,
        secs: 0,
        client_hardware_address: req.client_hardware_address,
        client_ip: if kind == DhcpMessageType::Ack {
            req.client_ip
        } else {
            Ipv4Address::UNSPECIFIED
        },
        your_ip,
        server_ip: Ipv4Address::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: req.relay_agent_ip,
        broadcast: req.broadcast,
        requested_ip: None,
        client_identifier: req.client_identifier,
        server_identifier: Some(ours),
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    if !nak {
        if with_lease {
            opts[n] = DhcpOption {
                kind: opt::LEASE_TIME,
                data: &lease_bytes,
            };
            n += 1;
        }
        opts[n] = DhcpOption {
            kind: opt::MTU,
            data: &mtu_bytes,
        };
        n += 1;
        let fixed = base.buffer_len() + if with_lease { 6 } else { 0 } + 4;
        let mut room = limit.saturating_sub(fixed);
        for (k, data) in &lease.options {
            if n == MAX_OPTIONS || data.len() + 2 > room {
                continue;
            }
            opts[n] = DhcpOption { kind: *k, data };
            n += 1;
            room -= data.len() + 2;
        }
    }
    base.additional_options = &opts[..n];
    // Padded to BOOTP's 300 bytes, which some clients still expect.
    let dhcp_len = base.buffer_len().max(BOOTP_MIN);
    buf.clear();
    buf.resize(HEADERS + dhcp_len, 0);
    base.emit(&mut DhcpPacket::new_unchecked(&mut buf[HEADERS..]))
        .map_err(|_| malformed(r, "answer too large"))?;
    // RFC 2131 4.1: to ciaddr when the client has one, else broadcast when it asks or for a
    // NAK, else to the offered address (the frame goes to the client's MAC in any case: the
    // port is point to point).
    let to = if !req.client_ip.is_unspecified() && !nak {
        req.client_ip
    } else if req.broadcast || nak || your_ip.is_unspecified() {
        Ipv4Address::BROADCAST
    } else {
        your_ip
    };
    let mut iph = Ipv4Header::new(
        (8 + dhcp_len) as u16,
        64,
        IpNumber::UDP,
        lease.server_id.octets(),
        to.octets(),
    )
    .map_err(|_| malformed(r, "answer too large"))?;
    iph.header_checksum = iph.calc_header_checksum();
    let udph = UdpHeader::with_ipv4_checksum(SERVER_PORT, CLIENT_PORT, &iph, &buf[HEADERS..])
        .map_err(|_| malformed(r, "answer too large"))?;
    let ethh = Ethernet2Header {
        source: lease.server_mac.0,
        destination: eth.source,
        ether_type: EtherType::IPV4,
    };
    buf[..14].copy_from_slice(&ethh.to_bytes());
    buf[14..34].copy_from_slice(&iph.to_bytes());
    buf[34..42].copy_from_slice(&udph.to_bytes());
    out.push(Output::Local {
        ifindex: r.in_ifindex,
    });
    r.note(STAGE, || {
        format!(
            "{:?} from {client} ({}): {kind:?} {your_ip} to {to}, server {ours}, MTU {mtu}",
            req.message_type,
            EthernetAddress(eth.source)
        )
    });
    Ok(r.answered(AnswerKind::Dhcp, lease.ip))
}
