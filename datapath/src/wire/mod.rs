//! Wire formats the datapath encodes and decodes itself. Ethernet, IPv4, UDP and ARP come from
//! etherparse; Geneve and the OVN option are ours.
pub mod geneve;
