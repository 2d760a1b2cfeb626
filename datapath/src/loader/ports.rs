//! Interfaces: registering them in PORTS, attaching the program to them (pinned links that
//! outlive the process, taken over and swapped on restart), their slow-path sockets, and
//! forgetting them.

use super::*;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;

/// An interface's XDP link, pinned: dropping it leaves the program attached; `Bpf::detach`
/// removes the pin and so the attachment.
#[derive(Debug)]
pub struct PortLink {
    link: FdLink,
    path: PathBuf,
    /// Still runs a previous process's program: `Bpf::swap_in` replaces it with ours.
    pending: bool,
}

impl PortLink {
    pub fn pending(&self) -> bool {
        self.pending
    }
}

impl Bpf {
    /// The program for interface `ifindex`: the multi-buffer one above `PLAIN_MTU`.
    fn prog(&mut self, ifindex: u32) -> Result<&mut Xdp, LoaderError> {
        let name = match crate::netdev::mtu_of_index(ifindex) {
            Some(m) if m > PLAIN_MTU => PROG_MB,
            _ => PROG,
        };
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or(LoaderError::MissingMap(name))?
            .try_into()?)
    }

    /// The configuration a previous process left for this interface, if any.
    pub fn pinned_port(&self, ifindex: u32) -> Option<PortConf> {
        self.ports.get(&ifindex, 0).ok()
    }

    /// Registers the interface in PORTS and attaches the program to it. If a previous process
    /// pinned a link for the interface, that link is taken over as it is, its program still
    /// serving the fast path (`pending`) until `swap_in`; otherwise a new link is made and
    /// pinned at once so that it outlives this process.
    pub fn attach(&mut self, ifindex: u32, conf: PortConf) -> Result<PortLink, LoaderError> {
        self.ports
            .insert(ifindex, conf, 0)
            .map_err(map_err("PORTS"))?;
        self.ports_changed()?;
        let path = self.pins.link_path(ifindex);
        if path.exists() {
            match PinnedLink::from_pin(&path) {
                Ok(p) => {
                    return Ok(PortLink {
                        link: p.into(),
                        path,
                        pending: true,
                    })
                }
                Err(e) => return self.replace_link(ifindex, path, e),
            }
        }
        self.attach_new(ifindex, path)
    }

    /// Gives up on a pinned link that cannot be taken over: removing its pin drops the last
    /// reference (detaching whatever it still holds), then a new link is attached.
    fn replace_link(
        &mut self,
        ifindex: u32,
        path: PathBuf,
        why: impl std::fmt::Display,
    ) -> Result<PortLink, LoaderError> {
        warn!(
            ifindex,
            "cannot take over the pinned XDP link, attaching anew: {why}"
        );
        let _ = std::fs::remove_file(&path);
        self.attach_new(ifindex, path)
    }

    fn attach_new(&mut self, ifindex: u32, path: PathBuf) -> Result<PortLink, LoaderError> {
        let mode = self.mode;
        let prog = self.prog(ifindex)?;
        let id = prog
            .attach_to_if_index(ifindex, mode)
            .map_err(|source| LoaderError::Attach { ifindex, source })?;
        let link = prog.take_link(id)?;
        let fd = FdLink::try_from(link).map_err(|_| LoaderError::NotALink(ifindex))?;
        let pinned = fd.pin(&path).map_err(|source| LoaderError::Pin {
            path: path.clone(),
            source,
        })?;
        Ok(PortLink {
            link: pinned.into(),
            path,
            pending: false,
        })
    }

    /// Puts this process's program into a pending link: an atomic replacement in the kernel
    /// (`bpf_link_update`), so no frame meets an interface without a program. A link that
    /// cannot be updated (its interface went away and came back) is replaced by a new one.
    pub fn swap_in(&mut self, ifindex: u32, link: PortLink) -> Result<PortLink, LoaderError> {
        if !link.pending {
            return Ok(link);
        }
        let PortLink { link, path, .. } = link;
        let swapped = XdpLink::try_from(link)
            .map_err(|_| LoaderError::NotALink(ifindex))
            .and_then(|xdp| {
                let prog = self.prog(ifindex)?;
                let id = prog
                    .attach_to_link(xdp)
                    .map_err(|source| LoaderError::Attach { ifindex, source })?;
                FdLink::try_from(prog.take_link(id)?).map_err(|_| LoaderError::NotALink(ifindex))
            });
        match swapped {
            Ok(fd) => Ok(PortLink {
                link: fd,
                path,
                pending: false,
            }),
            Err(e) => self.replace_link(ifindex, path, e),
        }
    }

    /// Rewrites an attached interface's configuration (e.g. the uplink's encap IP).
    pub fn update_port(&mut self, ifindex: u32, conf: PortConf) -> Result<(), LoaderError> {
        self.ports
            .insert(ifindex, conf, 0)
            .map_err(map_err("PORTS"))?;
        self.ports_changed()
    }

    /// After any change of PORTS: no CPU may keep serving from its cached configuration.
    fn ports_changed(&mut self) -> Result<(), LoaderError> {
        self.ports_gen = self.ports_gen.wrapping_add(1);
        self.write_config()
    }

    /// Detaches the program from the interface (removing its pin) and forgets the port.
    pub fn detach(&mut self, ifindex: u32, slot: u32, link: PortLink) {
        let _ = std::fs::remove_file(&link.path);
        drop(link.link);
        let _ = self.ports.remove(&ifindex);
        if let Err(e) = self.ports_changed() {
            warn!(ifindex, "detached port may stay cached on a CPU: {e}");
        }
        for q in 0..MAX_QUEUES {
            let _ = self.xsks.unset(slot * MAX_QUEUES + q);
        }
    }

    /// Removes links and port entries a previous process left for interfaces that are not in
    /// `keep` (unbound while it was down, or gone).
    pub fn forget_ports_except(&mut self, keep: &[u32]) -> Vec<u32> {
        let mut gone = Vec::new();
        for ix in self.pins.pinned_links() {
            if !keep.contains(&ix) {
                let _ = std::fs::remove_file(self.pins.link_path(ix));
                gone.push(ix);
            }
        }
        let stale: Vec<u32> = self
            .ports
            .keys()
            .flatten()
            .filter(|ix| !keep.contains(ix))
            .collect();
        for ix in stale {
            let _ = self.ports.remove(&ix);
            if !gone.contains(&ix) {
                gone.push(ix);
            }
        }
        if !gone.is_empty() {
            if let Err(e) = self.ports_changed() {
                warn!("forgotten ports may stay cached on a CPU: {e}");
            }
        }
        gone
    }

    /// The slow-path socket of receive queue `queue` of the interface in `slot`.
    pub fn set_xsk(&mut self, slot: u32, queue: u32, fd: &impl AsRawFd) -> Result<(), LoaderError> {
        self.xsks
            .set(slot * MAX_QUEUES + queue, fd.as_raw_fd(), 0)
            .map_err(map_err("XSKS"))
    }
}
