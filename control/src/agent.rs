//! The control-plane thread of `geneflowd`: watches the NB, validates and compiles it for this
//! chassis, and hands each new pipeline snapshot (with the set of logical datapaths that
//! changed) to the forwarder over a channel. A malformed NB or a bad record never replaces the
//! last good pipeline: the error is logged once and the datapath keeps forwarding.

use crate::compiler::{compile, Pipeline};
use crate::nb::{FileStore, Stamp};
use crossbeam_channel::Sender;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// How often the file backend is checked for a new document.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// A new compiled pipeline and the tunnel keys of the datapaths it changed.
#[derive(Debug, Clone)]
pub struct PipelineUpdate {
    pub pipeline: Arc<Pipeline>,
    pub changed: Vec<u32>,
    /// When the NB change was noticed, for change-to-fast-path latency.
    pub noticed: Instant,
}

pub fn spawn(
    store: FileStore,
    chassis: String,
    tx: Sender<PipelineUpdate>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("gf-control".into())
        .spawn(move || run(store, chassis, tx, stop))
}

fn run(store: FileStore, chassis: String, tx: Sender<PipelineUpdate>, stop: Arc<AtomicBool>) {
    let mut last_stamp: Option<Option<Stamp>> = None;
    let mut current = Pipeline {
        chassis: chassis.clone(),
        ..Default::default()
    };
    let mut sent_once = false;
    while !stop.load(Ordering::Relaxed) {
        let stamp = store.stamp();
        if last_stamp != Some(stamp) {
            last_stamp = Some(stamp);
            let noticed = Instant::now();
            match store.load() {
                Err(e) => error!("NB not applied, keeping the last good pipeline: {e}"),
                Ok(doc) => {
                    let v = doc.validated();
                    for r in &v.rejected {
                        warn!(nb_version = doc.version, "NB record skipped: {r}");
                    }
                    let started = Instant::now();
                    let p = compile(&v.doc, &chassis);
                    if p.encap_ip.is_none() {
                        warn!(chassis = %chassis, "no chassis record for this agent in the NB; tunnels need one");
                    }
                    if p != current || !sent_once {
                        let changed = current.changed_datapaths(&p);
                        info!(
                            nb_version = doc.version,
                            datapaths = p.datapaths.len(),
                            local_ports = p.bindings.len(),
                            changed = changed.len(),
                            compile_us = started.elapsed().as_micros() as u64,
                            "pipeline compiled"
                        );
                        current = p;
                        sent_once = true;
                        let upd = PipelineUpdate {
                            pipeline: Arc::new(current.clone()),
                            changed,
                            noticed,
                        };
                        if tx.send(upd).is_err() {
                            return;
                        }
                    }
                }
            }
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}
