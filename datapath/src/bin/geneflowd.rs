//! geneflowd: the per-chassis agent. Wires the control-plane thread (NB watch + compile), the
//! forwarder (XDP fast path + AF_XDP slow path), the local control socket and the Prometheus
//! exporter. Configuration comes from a TOML file (`--config`), every key overridable by a flag.

use anyhow::{bail, Context, Result};
use clap::Parser;
use geneflow_datapath::{
    config,
    ctl::CtlServer,
    exporter,
    forwarder::{Forwarder, ForwarderConfig},
    loader::Bpf,
    metrics::Shared,
    persist::PinDir,
    xsk::BindMode,
    XDP_OBJECT,
};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::info;

#[derive(Parser, Debug)]
#[command(
    name = "geneflowd",
    version,
    about = "geneflow per-chassis overlay agent"
)]
struct Args {
    /// Configuration file (TOML); flags override its keys.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This chassis's name in the NB.
    #[arg(long)]
    chassis: Option<String>,
    /// Local Geneve endpoint address (default: the chassis record in the NB).
    #[arg(long)]
    encap_ip: Option<Ipv4Addr>,
    /// NB DB URL: file:///path, etcd://host:port[,host:port...] or redis://host:port.
    #[arg(long)]
    nb: Option<String>,
    /// Underlay interface carrying Geneve.
    #[arg(long)]
    uplink: Option<String>,
    /// Seconds between reconciliations with the NB (a cheap revision check, a full compare
    /// when it moved; default 60, 0 = never).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=86_400))]
    nb_reconcile_secs: Option<u32>,
    /// DHCP answers per second per port (bursts as large; default 20).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    dhcp_rate: Option<u32>,
    /// A provider network: physnet name = local interface (repeatable).
    #[arg(long = "provider", value_parser = geneflow_datapath::config::parse_provider)]
    providers: Vec<(String, String)>,
    /// Local control socket.
    #[arg(long)]
    ctl_socket: Option<PathBuf>,
    /// Prometheus exporter address.
    #[arg(long)]
    metrics_address: Option<SocketAddr>,
    /// Compute the outer UDP checksum (otherwise zero, as RFC 8926 allows).
    #[arg(long, action = clap::ArgAction::Set)]
    udp_csum: Option<bool>,
    /// XDP attach mode.
    #[arg(long, value_parser = ["native", "skb"])]
    xdp_mode: Option<String>,
    /// AF_XDP bind mode (zero-copy needs driver support; veth is copy only).
    #[arg(long, value_parser = ["copy", "zero-copy"])]
    bind_mode: Option<String>,
    /// Cores for the slow path (comma separated): one thread per core listed, pinned there;
    /// receive queue q of every port goes to the (q mod n)th. With --datapath dpdk: one poll
    /// thread per core listed, each with its own queue on every port.
    #[arg(long, value_delimiter = ',')]
    forwarder_cores: Option<Vec<usize>>,
    /// Directory on bpffs for the pinned program, maps and XDP links
    /// (default /sys/fs/bpf/geneflow/<chassis>).
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// On exit, detach from every interface and remove the pinned state (by default the fast
    /// path keeps forwarding until the next geneflowd adopts it).
    #[arg(long)]
    cleanup: bool,
    /// Remove the pinned state a stopped geneflowd left (detaching its XDP program) and exit.
    #[arg(long, conflicts_with = "cleanup")]
    cleanup_only: bool,
    /// The datapath: XDP with an AF_XDP slow path, or DPDK poll mode (a build with the
    /// `dpdk` feature).
    #[arg(long, value_parser = ["xdp", "dpdk"])]
    datapath: Option<String>,
    /// With --datapath dpdk: the EAL's arguments, space separated (e.g. "-l 0 --no-huge
    /// --no-pci --no-shconf -m 256"); each port's device is added (an af_packet vdev on
    /// its kernel interface, or what --dpdk-devargs gives).
    #[arg(long, allow_hyphen_values = true)]
    dpdk_eal: Option<String>,
    /// With --datapath dpdk: a VM port to serve, by the name the NB binds it by: a kernel
    /// interface, or a name --dpdk-devargs gives a device (repeatable).
    #[arg(long = "dpdk-port")]
    dpdk_ports: Vec<String>,
    /// With --datapath dpdk: NAME=DEVARGS makes the port NAME (the uplink, a --dpdk-port or
    /// a --provider interface) the DPDK device DEVARGS, a PCI address (0000:03:00.0, with
    /// driver options after a comma) or a vdev string (net_vhost0,iface=/run/vm1.sock),
    /// instead of an af_packet vdev on the kernel interface NAME (repeatable).
    #[arg(long = "dpdk-devargs", value_parser = config::parse_devargs)]
    dpdk_devargs: Vec<(String, String)>,
    /// With --datapath dpdk: under light load (a round of polls brings less than half a
    /// burst) the poll loops sleep, a microsecond longer each such round, up to this many
    /// microseconds (OVS-DPDK's pmd-maxsleep); 0 (the default): they only nap when idle.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    dpdk_max_sleep_us: Option<u32>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("geneflowd: error: {e:#}");
        std::process::exit(1);
    }
}

/// A flag SIGINT and SIGTERM set.
fn stop_on_signal() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || s.store(true, Ordering::Relaxed))
        .context("installing the signal handler")?;
    Ok(stop)
}

fn pin_to(core: usize) -> Result<()> {
    geneflow_datapath::netdev::pin_thread(core)
        .with_context(|| format!("forwarder_cores: cannot pin to core {core}"))
}

/// Ports given as DPDK devices: (port name, PCI address or vdev string).
type Devargs = Vec<(String, String)>;

/// The DPDK datapath's own wiring: ports by EAL arguments, the control thread, the control
/// socket's `stats` and the Prometheus exporter over its counters.
#[cfg(feature = "dpdk")]
fn run_dpdk(
    agent: geneflow_control::agent::NbConfig,
    (eal, uplink, ports, devargs): (Vec<String>, String, Vec<String>, Devargs),
    (encap_ip, udp_csum, cores): (Option<Ipv4Addr>, bool, Vec<usize>),
    (providers, dhcp_rate, max_sleep_us): (Vec<(String, String)>, u32, u32),
    (ctl_socket, metrics_address): (PathBuf, SocketAddr),
) -> Result<()> {
    use geneflow_datapath::dpdk::serve::{serve, DpdkConfig};
    let stop = stop_on_signal()?;
    let chassis = agent.chassis.clone();
    let shared = Arc::new(Shared::new(
        &chassis,
        geneflow_datapath::metrics::heap_counters(),
    ));
    let no_xdp = Arc::new(Mutex::new(None));
    let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
    let _ctl = CtlServer::start(&ctl_socket, shared.clone(), no_xdp.clone(), ctl_tx)
        .with_context(|| format!("ctl socket {}", ctl_socket.display()))?;
    exporter::start(metrics_address, shared.clone(), no_xdp)
        .with_context(|| format!("metrics address {metrics_address}"))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let control =
        geneflow_control::agent::spawn(agent, tx, stop.clone(), shared.nb.clone(), Arc::new(|| {}))
            .context("starting the control thread")?;
    info!(chassis = %chassis, uplink = %uplink, "geneflowd running (DPDK datapath)");
    let cfg = DpdkConfig {
        eal,
        uplink,
        ports,
        devargs,
        encap_ip,
        udp_csum,
        cores,
        providers,
        dhcp_rate,
        max_sleep: Duration::from_micros(max_sleep_us.into()),
    };
    let r = serve(cfg, rx, ctl_rx, shared, stop.clone());
    stop.store(true, Ordering::Relaxed);
    let _ = control.join();
    r?;
    info!("geneflowd stopped (DPDK datapath)");
    Ok(())
}

#[cfg(not(feature = "dpdk"))]
fn run_dpdk(
    _: geneflow_control::agent::NbConfig,
    _: (Vec<String>, String, Vec<String>, Devargs),
    _: (Option<Ipv4Addr>, bool, Vec<usize>),
    _: (Vec<(String, String)>, u32, u32),
    _: (PathBuf, SocketAddr),
) -> Result<()> {
    bail!("--datapath dpdk: this geneflowd was built without DPDK (cargo feature `dpdk`)")
}

fn run(args: Args) -> Result<()> {
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(config::DEFAULT_PATH), false),
    };
    let file = config::load(&path, explicit)?;
    let chassis = args
        .chassis
        .or(file.chassis)
        .context("no chassis name: set `chassis` in the config or pass --chassis")?;
    if geneflow_control::model::check_name(&chassis).is_err() {
        bail!("--chassis {chassis:?}: not a valid chassis name");
    }
    let pin_dir = args
        .pin_dir
        .or(file.pin_dir)
        .unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/geneflow/{chassis}")));
    if args.cleanup_only {
        let pins = PinDir::open(&pin_dir)?;
        pins.remove_all();
        info!(pin_dir = %pin_dir.display(), "pinned datapath state removed; XDP detached");
        return Ok(());
    }
    let uplink = args
        .uplink
        .or(file.uplink)
        .context("no uplink: set `uplink` in the config or pass --uplink")?;
    let nb = args
        .nb
        .or(file.nb)
        .unwrap_or_else(|| "file:///var/lib/geneflow/nb.json".into());
    let ctl_socket = args
        .ctl_socket
        .or(file.ctl_socket)
        .unwrap_or_else(|| PathBuf::from("/run/geneflow/geneflowd.sock"));
    let metrics_address = args
        .metrics_address
        .or(file.metrics_address)
        .unwrap_or_else(|| "127.0.0.1:9469".parse().expect("static address"));
    let udp_csum = args.udp_csum.or(file.udp_csum).unwrap_or(true);
    let xdp_mode = args
        .xdp_mode
        .or(file.xdp_mode)
        .unwrap_or_else(|| "native".into());
    let bind_mode = args
        .bind_mode
        .or(file.bind_mode)
        .unwrap_or_else(|| "copy".into());
    let cores = args.forwarder_cores.or(file.forwarder_cores);
    let encap_ip = args.encap_ip.or(file.encap_ip);
    let dhcp_rate = args.dhcp_rate.or(file.dhcp_rate).unwrap_or(20);
    let reconcile = args
        .nb_reconcile_secs
        .or(file.nb_reconcile_secs)
        .unwrap_or(60);
    let providers = if args.providers.is_empty() {
        file.provider.unwrap_or_default()
    } else {
        args.providers
    };
    // Validate the URL up front: a bad one is a one-line error, not a retry loop.
    drop(geneflow_control::nb::open(&nb).with_context(|| format!("nb {nb}"))?);
    let datapath = args
        .datapath
        .or(file.datapath)
        .unwrap_or_else(|| "xdp".into());
    if datapath == "dpdk" {
        let agent = geneflow_control::agent::NbConfig {
            url: nb.clone(),
            chassis: chassis.clone(),
            reconcile: (reconcile > 0).then(|| Duration::from_secs(reconcile.into())),
            selective: true,
        };
        return run_dpdk(
            agent,
            (
                args.dpdk_eal
                    .map(|e| e.split_whitespace().map(str::to_string).collect())
                    .or(file.dpdk_eal)
                    .unwrap_or_default(),
                uplink,
                if args.dpdk_ports.is_empty() {
                    file.dpdk_ports.unwrap_or_default()
                } else {
                    args.dpdk_ports
                },
                if args.dpdk_devargs.is_empty() {
                    file.dpdk_devargs.unwrap_or_default()
                } else {
                    args.dpdk_devargs
                },
            ),
            (encap_ip, udp_csum, cores.unwrap_or_default()),
            (
                providers,
                dhcp_rate,
                args.dpdk_max_sleep_us
                    .or(file.dpdk_max_sleep_us)
                    .unwrap_or(0),
            ),
            (ctl_socket, metrics_address),
        );
    }

    let stop = stop_on_signal()?;
    let pins = PinDir::open(&pin_dir)?;
    let (mut bpf, adopted) =
        Bpf::load(XDP_OBJECT, xdp_mode == "skb", pins).context("loading the XDP program")?;
    if adopted.datapaths > 0 || adopted.megaflows > 0 {
        info!(
            megaflows = adopted.megaflows,
            datapaths = adopted.datapaths,
            pin_dir = %pin_dir.display(),
            "found the pinned fast path of a previous geneflowd; adopting it"
        );
    }
    let user_counters: geneflow_datapath::metrics::CounterStore = match bpf.slow_counters() {
        Ok(m) => Box::new(m),
        Err(e) => {
            tracing::warn!("slow-path counters on the heap (they restart from zero): {e}");
            geneflow_datapath::metrics::heap_counters()
        }
    };
    let shared = Arc::new(Shared::new(&chassis, user_counters));
    let nb_status = shared.nb.clone();
    let counters = Arc::new(Mutex::new(bpf.take_counters()));
    let cfg = ForwarderConfig {
        uplink: uplink.clone(),
        udp_csum,
        bind_mode: if bind_mode == "zero-copy" {
            BindMode::ZeroCopy
        } else {
            BindMode::Copy
        },
        encap_ip,
        providers,
        dhcp_rate,
        cores: cores.clone().unwrap_or_default(),
    };
    let mut fwd = Forwarder::new(cfg, bpf, adopted, shared.clone())
        .with_context(|| format!("uplink {uplink}"))?;
    let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
    let _ctl = CtlServer::start(&ctl_socket, shared.clone(), counters.clone(), ctl_tx)
        .with_context(|| format!("ctl socket {}", ctl_socket.display()))?;
    exporter::start(metrics_address, shared.clone(), counters)
        .with_context(|| format!("metrics address {metrics_address}"))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let waker = fwd
        .waker()
        .context("creating the forwarder's wake handle")?;
    let control = geneflow_control::agent::spawn(
        geneflow_control::agent::NbConfig {
            url: nb.clone(),
            chassis: chassis.clone(),
            reconcile: (reconcile > 0).then(|| Duration::from_secs(reconcile.into())),
            selective: true,
        },
        tx,
        stop.clone(),
        nb_status,
        Arc::new(move || waker.wake()),
    )
    .context("starting the control thread")?;
    if let Some(c) = cores.as_ref().and_then(|c| c.first()) {
        pin_to(*c)?;
        info!(core = c, "forwarder pinned");
    }
    info!(chassis = %chassis, nb = %nb, uplink = %uplink, metrics = %metrics_address, "geneflowd running");
    fwd.run(rx, ctl_rx, stop.clone());
    stop.store(true, Ordering::Relaxed);
    let _ = control.join();
    fwd.shutdown(args.cleanup);
    if args.cleanup {
        info!("geneflowd stopped; XDP programs detached, pinned state removed");
    } else {
        info!(pin_dir = %pin_dir.display(), "geneflowd stopped; the fast path keeps forwarding on its pinned state (--cleanup-only removes it)");
    }
    Ok(())
}
