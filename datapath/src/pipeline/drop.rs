//! Why the slow path dropped a frame, and the counter each reason is counted under (the same
//! namespace as the XDP program's drops).

use crate::wire::geneve;
use geneflow_abi::ctr;

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
    MalformedArp,
    NotRoutable,
    IpOptions,
    IpChecksum,
    Martian,
    NoRoute,
    ToRouter,
    SpoofedMac,
    SpoofedIp,
    SpoofedArp,
    Ipv6NotAllowed,
    UnknownGroup,
    UnknownSource,
    BadLength,
    Acl,
    DhcpMalformed,
    DhcpServer,
    NoNat,
    VlanTagged,
}

impl DropReason {
    /// The verdict follows from the key fields the stages consulted and the datapath's
    /// state alone, so a drop megaflow can repeat it in XDP. Not for verdicts on what the key
    /// does not hold (checksums, lengths, options, malformed headers), nor for an unknown
    /// destination MAC (legitimate traffic, often short-lived, that should not fill the
    /// megaflow table with drop entries).
    pub fn cacheable(self) -> bool {
        matches!(
            self,
            DropReason::SpoofedMac
                | DropReason::SpoofedIp
                | DropReason::SpoofedArp
                | DropReason::Ipv6NotAllowed
                | DropReason::UnknownDatapath
                | DropReason::UnknownPort
                | DropReason::UnknownGroup
                | DropReason::Acl
                | DropReason::VlanTagged
        )
    }

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
            DropReason::MalformedArp => ctr::DROP_MALFORMED_ARP,
            DropReason::NotRoutable => ctr::DROP_NOT_ROUTABLE,
            DropReason::IpOptions => ctr::DROP_IP_OPTIONS,
            DropReason::IpChecksum => ctr::DROP_IP_CSUM,
            DropReason::Martian => ctr::DROP_MARTIAN,
            DropReason::NoRoute => ctr::DROP_NO_ROUTE,
            DropReason::ToRouter => ctr::DROP_TO_ROUTER,
            DropReason::SpoofedMac => ctr::DROP_SPOOFED_MAC,
            DropReason::SpoofedIp => ctr::DROP_SPOOFED_IP,
            DropReason::SpoofedArp => ctr::DROP_SPOOFED_ARP,
            DropReason::Ipv6NotAllowed => ctr::DROP_IPV6,
            DropReason::UnknownGroup => ctr::DROP_UNKNOWN_GROUP,
            DropReason::UnknownSource => ctr::DROP_UNKNOWN_SOURCE,
            DropReason::BadLength => ctr::DROP_BAD_LENGTH,
            DropReason::Acl => ctr::DROP_ACL,
            DropReason::DhcpMalformed => ctr::DROP_DHCP_MALFORMED,
            DropReason::DhcpServer => ctr::DROP_DHCP_SERVER,
            DropReason::NoNat => ctr::DROP_NO_NAT,
            DropReason::VlanTagged => ctr::DROP_VLAN_TAGGED,
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
