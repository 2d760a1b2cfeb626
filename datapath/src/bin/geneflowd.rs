//! geneflowd: the per-chassis agent. Wires the control-plane thread (NB watch + compile), the
//! forwarder (XDP fast path + AF_XDP slow path) and the local control socket.

use anyhow::{bail, Context, Result};
use clap::Parser;
use geneflow_datapath::{
    ctl::CtlServer,
    forwarder::{Forwarder, ForwarderConfig},
    loader::Bpf,
    metrics::Shared,
    xsk::BindMode,
    XDP_OBJECT,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tracing::info;

#[derive(Parser, Debug)]
#[command(
    name = "geneflowd",
    version,
    about = "geneflow per-chassis overlay agent"
)]
struct Args {
    /// This chassis's name in the NB.
    #[arg(long)]
    chassis: String,
    /// NB DB URL: file:///path, etcd://host:port[,host:port...] or redis://host:port.
    #[arg(long, default_value = "file:///var/lib/geneflow/nb.json")]
    nb: String,
    /// Underlay interface carrying Geneve.
    #[arg(long)]
    uplink: String,
    /// Local control socket.
    #[arg(long, default_value = "/run/geneflow/geneflowd.sock")]
    ctl_socket: PathBuf,
    /// Compute the outer UDP checksum (otherwise zero, as RFC 8926 allows).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    udp_csum: bool,
    /// XDP attach mode.
    #[arg(long, default_value = "native", value_parser = ["native", "skb"])]
    xdp_mode: String,
    /// AF_XDP bind mode (zero-copy needs driver support; veth is copy only).
    #[arg(long, default_value = "copy", value_parser = ["copy", "zero-copy"])]
    bind_mode: String,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("geneflowd: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if geneflow_control::model::check_name(&args.chassis).is_err() {
        bail!("--chassis {:?}: not a valid chassis name", args.chassis);
    }
    // Validate the URL up front: a bad one is a one-line error, not a retry loop.
    drop(geneflow_control::nb::open(&args.nb).with_context(|| format!("--nb {}", args.nb))?);
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed))
            .context("installing the signal handler")?;
    }
    let mut bpf =
        Bpf::load(XDP_OBJECT, args.xdp_mode == "skb").context("loading the XDP program")?;
    let shared = Arc::new(Shared::new(&args.chassis));
    let nb_status = shared.nb.clone();
    let counters = bpf.take_counters();
    let cfg = ForwarderConfig {
        uplink: args.uplink.clone(),
        udp_csum: args.udp_csum,
        bind_mode: if args.bind_mode == "zero-copy" {
            BindMode::ZeroCopy
        } else {
            BindMode::Copy
        },
    };
    let mut fwd = Forwarder::new(cfg, bpf, shared.clone())
        .with_context(|| format!("--uplink {}", args.uplink))?;
    let _ctl = CtlServer::start(&args.ctl_socket, shared, counters)
        .with_context(|| format!("--ctl-socket {}", args.ctl_socket.display()))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let waker = fwd
        .waker()
        .context("creating the forwarder's wake handle")?;
    let control = geneflow_control::agent::spawn(
        args.nb.clone(),
        args.chassis.clone(),
        tx,
        stop.clone(),
        nb_status,
        Arc::new(move || waker.wake()),
    )
    .context("starting the control thread")?;
    info!(chassis = %args.chassis, nb = %args.nb, "geneflowd running");
    fwd.run(rx, stop.clone());
    stop.store(true, Ordering::Relaxed);
    let _ = control.join();
    drop(fwd);
    info!("geneflowd stopped; XDP programs detached");
    Ok(())
}
