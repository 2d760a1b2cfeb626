//! The resolver thread's I/O: two rtnetlink sockets (requests, and multicast events) around
//! the sans-IO `Table`.

use super::*;
use crate::netdev::rtnl::{align4, request, request_socket};
/// The background thread's side: two rtnetlink sockets (requests, and multicast events).
pub(super) struct Resolver {
    uplink: String,
    req: Socket,
    events: Socket,
    seq: u32,
    buf: Vec<u8>,
    table: Table,
    /// Managed neighbour entries work (kernel >= 5.16); otherwise a datagram triggers ARP.
    managed_ok: bool,
    probe: Option<UdpSocket>,
}

impl Resolver {
    pub(super) fn open(uplink: &str) -> std::io::Result<Resolver> {
        let mut events = Socket::new(NETLINK_ROUTE)?;
        events.bind_auto()?;
        for g in [
            libc::RTNLGRP_NEIGH,
            libc::RTNLGRP_IPV4_ROUTE,
            libc::RTNLGRP_LINK,
        ] {
            events.add_membership(g)?;
        }
        let _ = events.set_rx_buf_sz(1 << 20);
        events.set_non_blocking(true)?;
        let req = request_socket(Duration::from_secs(1))?;
        let ix = super::super::ifindex(uplink).unwrap_or(0);
        Ok(Resolver {
            uplink: uplink.to_string(),
            req,
            events,
            seq: 0,
            buf: vec![0u8; 1 << 16],
            table: Table::new(ix),
            managed_ok: true,
            probe: UdpSocket::bind("0.0.0.0:0")
                .and_then(|s| s.set_nonblocking(true).map(|_| s))
                .ok(),
        })
    }

    pub(super) fn run(
        mut self,
        rx: Receiver<Cmd>,
        wake: Arc<OwnedFd>,
        out: Published,
        stop: Arc<AtomicBool>,
    ) {
        // The event socket is subscribed before the dump: nothing falls between them.
        self.dump_neighbours();
        let mut last_routes = Instant::now();
        let mut handled = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let mut fds = [
                libc::pollfd {
                    fd: self.events.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: fds is a live array of two pollfd for descriptors we own.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
            let mut drain = 0u64;
            // SAFETY: drains the nonblocking eventfd into an 8-byte local.
            unsafe {
                libc::read(
                    wake.as_raw_fd(),
                    &mut drain as *mut u64 as *mut libc::c_void,
                    8,
                )
            };
            let mut lookup: Vec<Ipv4Addr> = Vec::new();
            while let Ok(c) = rx.try_recv() {
                handled += 1;
                match c {
                    Cmd::Want(ip) => {
                        if self.table.want(ip) {
                            lookup.push(ip);
                        }
                    }
                    Cmd::Track(set) => lookup.extend(self.table.track(&set)),
                }
            }
            let all_routes = self.drain_events() || last_routes.elapsed() >= ROUTE_RECHECK;
            if all_routes {
                last_routes = Instant::now();
                lookup = self.table.wanted();
            }
            for ip in lookup {
                self.lookup_route(ip);
            }
            for (remote, nh, oif) in self.table.due_triggers(Instant::now()) {
                self.trigger(remote, nh, oif);
            }
            if let Some((next, moved)) = self.table.publish() {
                out.snap.store(next);
                if moved {
                    out.changed.store(true, Ordering::Release);
                }
            }
            out.done.store(handled, Ordering::Release);
        }
    }

    /// Applies every pending event; true if routes or links changed (or events were lost),
    /// so every remote's route must be asked again.
    fn drain_events(&mut self) -> bool {
        let mut routes = false;
        loop {
            let n = match self.events.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    warn!("rtnetlink events overran; reading the neighbour table again");
                    self.dump_neighbours();
                    routes = true;
                    continue;
                }
                Err(e) => {
                    warn!("rtnetlink events: {e}");
                    break;
                }
            };
            let mut off = 0;
            while off < n.min(self.buf.len()) {
                let Ok(m) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..n])
                else {
                    break;
                };
                let len = m.header.length as usize;
                match m.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(nm)) => {
                        if let Some((ix, ip, e)) = parse_neigh(&nm) {
                            self.table.neigh_event(ix, ip, Some(e));
                        }
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(nm)) => {
                        if let Some((ix, ip, _)) = parse_neigh(&nm) {
                            self.table.neigh_event(ix, ip, None);
                        }
                    }
                    NetlinkPayload::InnerMessage(
                        RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_),
                    ) => routes = true,
                    NetlinkPayload::InnerMessage(
                        RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_),
                    ) => {
                        routes = true;
                        let ix = super::super::ifindex(&self.uplink).unwrap_or(0);
                        if ix != self.table.uplink_ix {
                            info!(uplink = %self.uplink, ifindex = ix, "uplink ifindex changed");
                            self.table.reset_uplink(ix);
                            self.dump_neighbours();
                        }
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += align4(len);
            }
        }
        routes
    }

    fn dump_neighbours(&mut self) {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        let uplink_ix = self.table.uplink_ix;
        let got = self.request(
            RouteNetlinkMessage::GetNeighbour(m),
            NLM_F_REQUEST | NLM_F_DUMP,
        );
        match got {
            Ok(list) => {
                self.table.neigh.clear();
                for r in list {
                    if let RouteNetlinkMessage::NewNeighbour(nm) = r {
                        if let Some((ix, ip, e)) = parse_neigh(&nm) {
                            if ix == uplink_ix {
                                self.table.neigh_event(ix, ip, Some(e));
                            }
                        }
                    }
                }
            }
            Err(e) => warn!("cannot dump the neighbour table: {e}"),
        }
    }

    /// Asks the FIB where `ip` goes (as `ip route get`) and records the answer.
    fn lookup_route(&mut self, ip: Ipv4Addr) {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = 32;
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(ip)));
        let r = match self.request(RouteNetlinkMessage::GetRoute(m), NLM_F_REQUEST) {
            Ok(list) => list
                .iter()
                .find_map(|r| match r {
                    RouteNetlinkMessage::NewRoute(rm) => Some(parse_route(rm, ip)),
                    _ => None,
                })
                .unwrap_or(Route::Unusable("the FIB gave no answer")),
            Err(e) if e.raw_os_error() == Some(libc::ENETUNREACH) => Route::Unusable("no route"),
            Err(e) => {
                debug!(%ip, "route lookup: {e}");
                Route::Unusable("the route lookup failed")
            }
        };
        if let Some(before) = self.table.set_route(ip, r) {
            let (route, _) = self.table.describe(ip);
            match route {
                Some(Route::Via { nh, oif }) if nh == ip => {
                    info!(remote = %ip, ifindex = oif, "remote chassis is directly connected")
                }
                Some(Route::Via { nh, oif }) => {
                    info!(remote = %ip, via = %nh, ifindex = oif, "remote chassis is routed")
                }
                Some(Route::Unusable(why)) => {
                    warn!(remote = %ip, uplink = %self.uplink, "no underlay next hop toward remote chassis: {why}")
                }
                None => {}
            }
            debug!(remote = %ip, ?before, "route changed");
        }
    }

    /// Makes the kernel resolve next hop `nh` on `oif`, without waiting for it. The entry is
    /// created (or turned, keeping its address and state) *managed* (`NTF_EXT_MANAGED`, as `ip neigh replace NH dev UPLINK
    /// managed`): the kernel resolves it at once and then keeps it resolved on its own, which
    /// the fast path needs because its traffic never passes the kernel's neighbour code (an
    /// ordinary entry would stay STALE forever, never re-verified, and would be garbage
    /// collected). It also sends nothing to the remote chassis. Static entries (PERMANENT,
    /// NOARP) are never touched (the request would drop their PERMANENT state). On a kernel without managed entries (< 5.16), one empty UDP datagram to the
    /// discard port of the remote chassis makes the kernel route it and resolve the next hop.
    fn trigger(&mut self, remote: Ipv4Addr, nh: Ipv4Addr, oif: u32) {
        if self.managed_ok {
            let mut m = NeighbourMessage::default();
            m.header.family = AddressFamily::Inet;
            m.header.ifindex = oif;
            m.header.state = NeighbourState::None;
            m.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(nh)));
            m.attributes
                .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
            match self.request(
                RouteNetlinkMessage::NewNeighbour(m),
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            ) {
                Ok(_) => {
                    debug!(%remote, %nh, "resolving underlay next hop (managed neighbour)");
                    return;
                }
                Err(e) => {
                    warn!(%nh, "cannot create a managed neighbour entry ({e}); probing with datagrams instead");
                    self.managed_ok = false;
                }
            }
        }
        if let Some(s) = &self.probe {
            debug!(%remote, %nh, "probing underlay next hop");
            let _ = s.send_to(&[], (remote, 9));
        }
    }

    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> std::io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        request(&self.req, &mut self.buf, self.seq, msg, flags)
    }
}
