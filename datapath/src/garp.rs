//! Announcing floating IPs: each floating IP bound to this chassis now and not before (its
//! port arrived, or it was just created) is announced with a gratuitous ARP out of its
//! provider network (on its VLAN), so that the physical network learns where its MAC went.
//! Shared by both backends; they send the frames.

use crate::pipeline::rewrite::{arp_frame, push_vlan};
use crate::pipeline::{Output, Tables};
use geneflow_control::model::Mac;
use std::net::Ipv4Addr;

/// A floating IP as announced: external address, MAC, provider interface, VLAN.
type Announced = (Ipv4Addr, [u8; 6], u32, u16);

#[derive(Default)]
pub struct FipAnnouncer {
    announced: Vec<Announced>,
    /// Some announcement could not be sent (a full queue): `due` is asked again on the
    /// next housekeeping round, not only on the next NB change.
    owed: bool,
}

/// One gratuitous ARP to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Garp {
    pub ip: Ipv4Addr,
    pub ifindex: u32,
    pub frame: Vec<u8>,
    what: Announced,
}

impl FipAnnouncer {
    /// The announcements `tables` call for that were not made for the previous ones.
    pub fn due(&mut self, tables: &Tables) -> Vec<Garp> {
        let mut now: Vec<Announced> = Vec::new();
        for rt in tables.pipeline.routers.values() {
            let Some(gw) = rt.gateway.map(|g| &rt.ports[g]) else {
                continue;
            };
            let Some(Output::Provider { ifindex, vlan }) = tables.provider_output(gw.switch) else {
                continue;
            };
            for f in rt.fips.iter().filter(|f| f.local) {
                now.push((f.external_ip, f.mac.0, ifindex, vlan));
            }
        }
        let mut out = Vec::new();
        for &(ip, mac, ifindex, vlan) in &now {
            if self.announced.contains(&(ip, mac, ifindex, vlan)) {
                continue;
            }
            let mut frame = Vec::with_capacity(64);
            arp_frame(&mut frame, Mac(mac), ip, ip, true);
            if vlan != 0 {
                let mut tagged = [0u8; 64];
                let Some(n) = push_vlan(&mut tagged, &frame, vlan) else {
                    continue;
                };
                frame.clear();
                frame.extend_from_slice(&tagged[..n]);
            }
            out.push(Garp {
                ip,
                ifindex,
                frame,
                what: (ip, mac, ifindex, vlan),
            });
        }
        self.announced = now;
        self.owed = false;
        out
    }

    /// `g` could not be sent: it is due again (see `owed`).
    pub fn unsent(&mut self, g: &Garp) {
        self.announced.retain(|a| *a != g.what);
        self.owed = true;
    }

    /// Whether an announcement is owed since a send failed.
    pub fn owed(&self) -> bool {
        self.owed
    }
}
