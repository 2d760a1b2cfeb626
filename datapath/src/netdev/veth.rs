//! GRO on the veth peer of an XDP redirect target, without iproute2 or ethtool: rtnetlink
//! finds the peer (its ifindex and the id of its namespace), `RTM_GETNSID` maps that id to a
//! named namespace (/run/netns, as `ip netns list-id` does), and the legacy ethtool ioctl
//! `ETHTOOL_SGRO` turns GRO on from a short-lived thread that entered the namespace
//! (`setns` changes the namespace of the calling thread only).

use super::rtnl::{request, request_socket};
use netlink_packet_core::NLM_F_REQUEST;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use netlink_packet_route::RouteNetlinkMessage;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// What rtnetlink says about an interface.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct LinkFacts {
    pub is_veth: bool,
    /// The peer's ifindex (in its own namespace).
    pub peer_ifindex: Option<u32>,
    /// The id, in this namespace, of the peer's namespace when it is another one.
    pub peer_nsid: Option<i32>,
}

pub(crate) fn parse_link(m: &LinkMessage) -> LinkFacts {
    let mut f = LinkFacts {
        is_veth: false,
        peer_ifindex: None,
        peer_nsid: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::LinkInfo(infos) => {
                f.is_veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            LinkAttribute::Link(ix) => f.peer_ifindex = Some(*ix),
            LinkAttribute::LinkNetNsId(id) if *id >= 0 => f.peer_nsid = Some(*id),
            _ => {}
        }
    }
    f
}

pub(crate) fn link_facts(ifindex: u32) -> std::io::Result<LinkFacts> {
    let sock = request_socket(Duration::from_secs(1))?;
    let mut buf = vec![0u8; 1 << 16];
    let mut m = LinkMessage::default();
    m.header.index = ifindex;
    let got = request(
        &sock,
        &mut buf,
        1,
        RouteNetlinkMessage::GetLink(m),
        NLM_F_REQUEST,
    )?;
    got.iter()
        .find_map(|r| match r {
            RouteNetlinkMessage::NewLink(l) => Some(parse_link(l)),
            _ => None,
        })
        .ok_or_else(|| std::io::Error::other("no RTM_NEWLINK answer"))
}

/// The named namespace (a file of /run/netns) whose id in this namespace is `nsid`.
pub(crate) fn named_netns(nsid: i32) -> Option<(String, std::fs::File)> {
    let sock = request_socket(Duration::from_secs(1)).ok()?;
    let mut buf = vec![0u8; 1 << 16];
    let mut seq = 0;
    for e in std::fs::read_dir("/run/netns").ok()?.flatten() {
        let Ok(f) = std::fs::File::open(e.path()) else {
            continue;
        };
        seq += 1;
        let mut m = NsidMessage::default();
        m.attributes.push(NsidAttribute::Fd(f.as_raw_fd() as u32));
        let Ok(got) = request(
            &sock,
            &mut buf,
            seq,
            RouteNetlinkMessage::GetNsId(m),
            NLM_F_REQUEST,
        ) else {
            continue;
        };
        let id = got.iter().find_map(|r| match r {
            RouteNetlinkMessage::NewNsId(n) => n.attributes.iter().find_map(|a| match a {
                NsidAttribute::Id(i) => Some(*i),
                _ => None,
            }),
            _ => None,
        });
        if id == Some(nsid) {
            return Some((e.file_name().to_string_lossy().into_owned(), f));
        }
    }
    None
}

/// `struct ethtool_value` of linux/ethtool.h.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

const ETHTOOL_GFLAGS: u32 = 0x25;
const ETHTOOL_SFLAGS: u32 = 0x26;
const ETHTOOL_SGRO: u32 = 0x2c;
/// `ETH_FLAG_RXVLAN`: the NIC takes 802.1Q tags off into the descriptor.
const ETH_FLAG_RXVLAN: u32 = 1 << 8;

/// One legacy ethtool ioctl (`SIOCETHTOOL` with an `ethtool_value`) on interface `name`.
fn ethtool(
    name: [libc::c_char; libc::IF_NAMESIZE],
    value: &mut EthtoolValue,
) -> std::io::Result<()> {
    /// `struct ifreq` with the `ifr_data` member of its union (40 bytes on 64-bit).
    #[repr(C)]
    struct IfreqData {
        name: [libc::c_char; libc::IF_NAMESIZE],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    let mut req = IfreqData {
        name,
        data: value as *mut EthtoolValue as *mut libc::c_void,
        _pad: [0; 16],
    };
    // SAFETY: plain socket(2); the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCETHTOOL with an ifreq whose data points to a live ethtool_value, both live
    // for the duration of the call; fd is the socket opened above.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut req as *mut IfreqData) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closes the descriptor opened above, once.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(err);
    }
    Ok(())
}

/// Turns GRO on for interface `ifindex` of the calling thread's namespace; returns its name.
pub(crate) fn gro_on(ifindex: u32) -> std::io::Result<String> {
    let name = super::ifname_raw(ifindex)?;
    ethtool(
        name,
        &mut EthtoolValue {
            cmd: ETHTOOL_SGRO,
            data: 1,
        },
    )?;
    Ok(super::c_name(&name))
}

/// Turns off receive VLAN offload on interface `ifindex` (ethtool's `rxvlan`), so that 802.1Q
/// tags stay in the frame where XDP reads them. `Ok(false)` if it was off already.
pub(crate) fn rx_vlan_offload_off(ifindex: u32) -> std::io::Result<bool> {
    let name = super::ifname_raw(ifindex)?;
    let mut v = EthtoolValue {
        cmd: ETHTOOL_GFLAGS,
        data: 0,
    };
    ethtool(name, &mut v)?;
    if v.data & ETH_FLAG_RXVLAN == 0 {
        return Ok(false);
    }
    ethtool(
        name,
        &mut EthtoolValue {
            cmd: ETHTOOL_SFLAGS,
            data: v.data & !ETH_FLAG_RXVLAN,
        },
    )?;
    Ok(true)
}

/// `gro_on` inside the namespace of `ns` (an open /run/netns file), from a thread of its own.
pub(crate) fn gro_on_in(ns: &std::fs::File, ifindex: u32) -> std::io::Result<String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) with a namespace file descriptor we hold open; CLONE_NEWNET
            // moves this (scoped, about to end) thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            gro_on(ifindex)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("namespace thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::LinkInfo;

    #[test]
    fn parses_a_veth_with_its_peer_in_another_namespace() {
        let mut m = LinkMessage::default();
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Veth,
            )]));
        m.attributes.push(LinkAttribute::Link(12));
        m.attributes.push(LinkAttribute::LinkNetNsId(3));
        assert_eq!(
            parse_link(&m),
            LinkFacts {
                is_veth: true,
                peer_ifindex: Some(12),
                peer_nsid: Some(3)
            }
        );
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::LinkNetNsId(-1));
        assert_eq!(parse_link(&m).peer_nsid, None);
        assert!(!parse_link(&m).is_veth);
    }
}
