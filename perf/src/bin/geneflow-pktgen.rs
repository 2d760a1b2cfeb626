//! geneflow-pktgen: XDP live-frames packet generator (IPv4 UDP or Geneve-encapsulated), a
//! counting sink and a plain redirect, with a live progress line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use geneflow_control::model::Mac;
use geneflow_datapath::pipeline::EncapParams;
use geneflow_perf::pktgen::{self, Generator, Pass, Redirect, Sink, UdpSpec, Vary};
use std::io::Write;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "geneflow-pktgen",
    about = "XDP live-frames packet generator and sink"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum VaryArg {
    Sport,
    Mac,
    DstMac,
    Ip,
    DstIp,
}

impl VaryArg {
    fn vary(self) -> Vary {
        match self {
            VaryArg::Sport => Vary::SrcPort,
            VaryArg::Mac => Vary::SrcMac,
            VaryArg::DstMac => Vary::DstMac,
            VaryArg::Ip => Vary::SrcIp,
            VaryArg::DstIp => Vary::DstIp,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Proto {
    Udp,
    /// TCP SYNs: with a varied field, every frame a new connection attempt.
    TcpSyn,
    /// DHCP DISCOVERs from --src-mac (the DHCP responder's load; addresses and ports are
    /// DHCP's own, --flows must be 1).
    DhcpDiscover,
}

#[derive(Subcommand)]
enum Cmd {
    /// Transmit frames out of an interface.
    Send {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        src_mac: Mac,
        #[arg(long)]
        dst_mac: Mac,
        #[arg(long)]
        src_ip: Ipv4Addr,
        #[arg(long)]
        dst_ip: Ipv4Addr,
        #[arg(long, default_value_t = 10000)]
        sport: u16,
        #[arg(long, default_value_t = 9)]
        dport: u16,
        /// Frame size in bytes (inner frame when encapsulating), at least 60.
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        flows: u32,
        #[arg(long, value_enum, default_value = "sport")]
        vary: VaryArg,
        /// A second field, moved on after each round of --flows values of the first: the
        /// pair goes through flows x 65,536 combinations.
        #[arg(long, value_enum)]
        vary2: Option<VaryArg>,
        #[arg(long, value_enum, default_value = "udp")]
        proto: Proto,
        /// Packets per second; 0 = as fast as possible.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Packets to send; 0 = until --duration.
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Seconds, at most.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Encapsulate in Geneve with this VNI (and the outer fields below).
        #[arg(long)]
        geneve_vni: Option<u32>,
        #[arg(long, default_value_t = 1)]
        ovn_ingress: u16,
        #[arg(long, default_value_t = 1)]
        ovn_egress: u16,
        #[arg(long)]
        outer_src_mac: Option<Mac>,
        #[arg(long)]
        outer_dst_mac: Option<Mac>,
        #[arg(long)]
        outer_src_ip: Option<Ipv4Addr>,
        #[arg(long)]
        outer_dst_ip: Option<Ipv4Addr>,
        /// No progress line.
        #[arg(long)]
        quiet: bool,
        /// The minimal live-frames generator instead: the template as it is, every frame
        /// (one flow; no per-frame rewrite). It shows what the live-frames path itself allows
        /// on this machine, the reference for the generator's own ceiling.
        #[arg(long)]
        minimal: bool,
        /// Do not restore the template's first 64 bytes before each frame. Only where the
        /// device under test never rewrites a frame in place (a router's MACs and TTL, a
        /// NAT, a VLAN push do): pages come back to the generator as the device left them.
        /// The restore costs about a tenth of the generator's rate.
        #[arg(long)]
        no_restore: bool,
    },
    /// Count (and drop) what arrives on an interface; print packets/s over a window.
    Sink {
        #[arg(long)]
        iface: String,
        /// Measurement window after the first packet, seconds.
        #[arg(long, default_value_t = 2.0)]
        window: f64,
        /// Give up if nothing arrives within this many seconds.
        #[arg(long, default_value_t = 10.0)]
        wait: f64,
    },
    /// Redirect everything from one interface to another in XDP until interrupted.
    Redirect {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        /// Seconds to hold (0 = until SIGINT/SIGTERM).
        #[arg(long, default_value_t = 0.0)]
        hold: f64,
        /// Look every frame up in a megaflow-shaped hash table first (its first 40 bytes as
        /// the key, inserted on a miss): the floor of a datapath that looks frames up once.
        #[arg(long)]
        lookup: bool,
    },
    /// XDP_PASS on an interface until interrupted: a veth read without XDP (af_packet) then
    /// takes what the generator on its other end sends.
    Pass {
        #[arg(long)]
        iface: String,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("geneflow-pktgen: error: {e:#}");
        std::process::exit(1);
    }
}

fn stop_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let _ = ctrlc::set_handler(move || s.store(true, Ordering::Relaxed));
    stop
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Send {
            iface,
            src_mac,
            dst_mac,
            src_ip,
            dst_ip,
            sport,
            dport,
            size,
            flows,
            vary,
            vary2,
            proto,
            rate,
            count,
            duration,
            geneve_vni,
            ovn_ingress,
            ovn_egress,
            outer_src_mac,
            outer_dst_mac,
            outer_src_ip,
            outer_dst_ip,
            quiet,
            minimal,
            no_restore,
        } => {
            let spec = UdpSpec {
                src_mac: src_mac.0,
                dst_mac: dst_mac.0,
                src_ip,
                dst_ip,
                sport,
                dport,
                size,
            };
            let mut t = match proto {
                Proto::Udp if vary2.is_some() => bail!("--vary2 needs --proto tcp-syn"),
                Proto::Udp => pktgen::udp_template(&spec, vary.vary())?,
                Proto::TcpSyn => {
                    pktgen::tcp_syn_template(&spec, vary.vary(), vary2.map(VaryArg::vary))?
                }
                Proto::DhcpDiscover if flows != 1 => bail!("--proto dhcp-discover needs --flows 1"),
                Proto::DhcpDiscover => pktgen::dhcp_discover_template(&spec)?,
            };
            if let Some(vni) = geneve_vni {
                let need = |o: Option<Mac>, n: &str| {
                    o.map(|m| m.0)
                        .with_context(|| format!("--{n} is needed with --geneve-vni"))
                };
                let p = EncapParams {
                    src_mac: need(outer_src_mac, "outer-src-mac")?,
                    dst_mac: need(outer_dst_mac, "outer-dst-mac")?,
                    src_ip: outer_src_ip.context("--outer-src-ip is needed with --geneve-vni")?,
                    dst_ip: outer_dst_ip.context("--outer-dst-ip is needed with --geneve-vni")?,
                    sport: 49152,
                    vni,
                    meta: pktgen::ovn(ovn_ingress, ovn_egress),
                    udp_csum: false,
                };
                t = pktgen::geneve_template(&t, &p)?;
            }
            let g = if minimal {
                Generator::minimal(&t, &iface)?
            } else {
                Generator::new(&t, flows, &iface, !no_restore)?
            };
            let start = Instant::now();
            let sent = g.run(count, Duration::from_secs_f64(duration), rate, |n, el| {
                if !quiet {
                    eprint!(
                        "\r{n:>12} frames  {:>7.3} Mpps  {:>5.1}s",
                        n as f64 / el.as_secs_f64() / 1e6,
                        el.as_secs_f64()
                    );
                }
            })?;
            if !quiet {
                eprintln!();
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{{\"sent\":{sent},\"secs\":{secs:.3},\"mpps\":{:.4},\"frame_len\":{}}}",
                sent as f64 / secs / 1e6,
                t.frame.len()
            );
        }
        Cmd::Sink {
            iface,
            window,
            wait,
        } => {
            let s = Sink::attach(&iface)?;
            println!("ready");
            std::io::stdout().flush()?;
            let t0 = Instant::now();
            while s.count()?.0 == 0 {
                if t0.elapsed().as_secs_f64() > wait {
                    println!("{{\"pkts\":0,\"bytes\":0,\"secs\":0,\"mpps\":0}}");
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            // Skip the ramp-up, then measure a clean window.
            std::thread::sleep(Duration::from_millis(200));
            let (p0, b0) = s.count()?;
            let w0 = Instant::now();
            std::thread::sleep(Duration::from_secs_f64(window));
            let (p1, b1) = s.count()?;
            let secs = w0.elapsed().as_secs_f64();
            println!(
                "{{\"pkts\":{},\"bytes\":{},\"secs\":{secs:.3},\"mpps\":{:.4}}}",
                p1 - p0,
                b1 - b0,
                (p1 - p0) as f64 / secs / 1e6
            );
        }
        Cmd::Pass { iface } => {
            let stop = stop_flag();
            let _p = Pass::attach(&iface)?;
            println!("ready");
            std::io::stdout().flush()?;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Cmd::Redirect {
            from,
            to,
            hold,
            lookup,
        } => {
            let stop = stop_flag();
            let _r = Redirect::attach(&from, &to, lookup)?;
            println!("ready");
            std::io::stdout().flush()?;
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed)
                && (hold == 0.0 || t0.elapsed().as_secs_f64() < hold)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Ok(())
}
