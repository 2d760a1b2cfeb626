//! The first slow-path thread's side of the others (`worker`): starting them, dealing them
//! their sockets, publishing the tables to them, and carrying out what they hand over.

use super::*;

impl Forwarder {
    /// Starts the other slow-path threads, one per core of `cfg.cores` after the first.
    pub(super) fn start_workers(&mut self) -> Result<(), ForwarderError> {
        let n = self
            .cfg
            .cores
            .len()
            .clamp(1, geneflow_abi::MAX_QUEUES as usize);
        self.shared.slow_threads.store(n as u64, Ordering::Relaxed);
        if n == 1 {
            return Ok(());
        }
        let view = worker::View {
            version: 0,
            tables: self.tables.clone(),
            ready: false,
            gens: Arc::new(self.bpf.generations()),
        };
        let crew = Arc::new(worker::Crew::new(
            self.waker().map_err(ForwarderError::Io)?,
            view,
            self.bpf.mask_lists(),
            n - 1,
        ));
        self.masks_published = self.bpf.mask_count();
        for id in 1..n {
            let hand = worker::spawn(worker::WorkerSetup {
                id,
                core: self.cfg.cores.get(id).copied(),
                crew: crew.clone(),
                flows: self.bpf.flow_writer()?,
                shared: self.shared.clone(),
                neigh: self.neigh.reader(),
                uplink: (self.uplink_ifindex, self.uplink_mac),
                udp_csum: self.cfg.udp_csum,
                share: 1.0 / n as f32,
            })?;
            self.hands.push(hand);
        }
        // This thread's share of the chassis's budget of drop entries; the per-port rate is
        // each thread's (a single-queue port meets only this one).
        let share = 1.0 / n as f32;
        self.drop_installs = RateLimiter::new(1000.0, 2000.0, 10_000.0 * share);
        info!(threads = n, cores = ?self.cfg.cores, "slow-path threads started");
        self.crew = Some(crew);
        Ok(())
    }

    /// Publishes the tables to the other slow-path threads, with the generations they stamp
    /// their megaflows with. The generations may have moved with them: a megaflow decided
    /// on earlier tables that another thread hands over is not installed, and one it added
    /// itself is stale in XDP at once (and deleted when its note comes, see `Bpf::record`).
    pub(super) fn publish(&mut self) {
        let Some(crew) = &self.crew else { return };
        self.view_version += 1;
        crew.view.store(Arc::new(worker::View {
            version: self.view_version,
            tables: self.tables.clone(),
            ready: self.ready,
            gens: Arc::new(self.bpf.generations()),
        }));
    }

    /// Publishes the mask lists to the other slow-path threads once a mask was added: they
    /// install megaflows under the masks they know and hand the others over.
    fn publish_masks(&mut self) {
        let Some(crew) = &self.crew else { return };
        let n = self.bpf.mask_count();
        if n != self.masks_published {
            crew.masks.store(Arc::new(self.bpf.mask_lists()));
            self.masks_published = n;
        }
    }

    /// Stops the other slow-path threads and waits for them (they close their sockets).
    pub(super) fn stop_workers(&mut self) {
        if let Some(crew) = &self.crew {
            crew.stop.store(true, Ordering::Relaxed);
        }
        for h in self.hands.iter_mut() {
            h.wake.wake();
            if let Some(j) = h.join.take() {
                let _ = j.join();
            }
        }
    }

    /// Gives the sockets of the queues other threads serve (queue `q` to thread `q % n`) to
    /// them; returns this thread's.
    pub(super) fn deal(&mut self, ifindex: u32, slot: u32, xsks: Vec<Xsk>) -> Vec<Xsk> {
        let n = self.hands.len() + 1;
        if n == 1 {
            return xsks;
        }
        let mut mine = Vec::new();
        let mut theirs: Vec<Vec<Xsk>> = (1..n).map(|_| Vec::new()).collect();
        for (q, x) in xsks.into_iter().enumerate() {
            match q % n {
                0 => mine.push(x),
                w => theirs[w - 1].push(x),
            }
        }
        for (hand, xsks) in self.hands.iter().zip(theirs) {
            if !xsks.is_empty() {
                let _ = hand.tx.send(worker::ToWorker::Attach {
                    ifindex,
                    slot,
                    xsks,
                });
                hand.wake.wake();
            }
        }
        mine
    }

    /// Megaflows and frames the other slow-path threads handed to this one.
    pub(super) fn handed_over(&mut self) -> usize {
        let Some(crew) = self.crew.clone() else {
            return 0;
        };
        let mut work = 0;
        // The entries they put in the map themselves, into the mirror.
        for a in crew
            .added
            .iter()
            .flat_map(|(_, rx)| rx.try_iter().take(1024))
        {
            work += 1;
            if self.bpf.record(a.key, a.action) == Recorded::Installed {
                forward::installed(&self.bpf, &self.shared, a.in_slot, a.arrived);
            }
        }
        for r in crew.installs.1.try_iter().take(1024) {
            work += 1;
            if !self.ready || r.version != self.view_version {
                continue;
            }
            if r.drop {
                let up = self.uplink_ifindex;
                Self::install(
                    &mut self.bpf,
                    &self.shared,
                    &r.m,
                    r.in_ifindex,
                    up,
                    r.in_slot,
                    None,
                );
            } else {
                self.install_decided(r.m, r.in_ifindex, r.in_slot, Some(r.arrived));
            }
        }
        self.publish_masks();
        if crew.punts.1.is_empty() {
            return work;
        }
        let mut from = [(0u32, 0u32, Instant::now()); BATCH];
        let mut n = 0;
        while n < BATCH {
            let Ok(p) = crew.punts.1.try_recv() else {
                break;
            };
            let len = p.buf.len().min(STRIDE);
            self.rxbuf[n * STRIDE..n * STRIDE + len].copy_from_slice(&p.buf[..len]);
            self.rxlen[n] = len;
            self.rxct[n] = p.meta;
            from[n] = (p.in_ifindex, p.in_slot, p.arrived);
            let _ = crew.spare.0.try_send(p.buf);
            n += 1;
        }
        let mut learned = false;
        for (k, &(ifindex, slot, arrived)) in from.iter().enumerate().take(n) {
            learned |= self.forward(k, ifindex, slot, arrived);
        }
        if learned && self.ready {
            self.regenerate();
            self.publish();
        }
        work + n
    }
}

impl Drop for Forwarder {
    /// A forwarder dropped without `shutdown` (a start that failed after the threads began)
    /// does not leave them running.
    fn drop(&mut self) {
        self.stop_workers();
    }
}
