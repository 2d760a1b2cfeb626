//! geneflowctl: edits the NB DB in the style of ovn-nbctl and inspects a running agent over
//! its local control socket.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::time::Duration;

mod nbargs;
mod nbctl;
mod nbshow;
use nbargs::NbCmd;

const DEFAULT_DB: &str = "file:///var/lib/geneflow/nb.json";

/// How to reach a running agent, and how to print what it answers.
#[derive(clap::Args)]
struct Agent {
    /// Agent control socket.
    #[arg(
        long,
        env = "GENEFLOW_CTL",
        default_value = "/run/geneflow/geneflowd.sock"
    )]
    socket: String,
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    format: String,
}

impl Agent {
    fn request(&self, req: &str) -> Result<serde_json::Value> {
        ctl_request(&self.socket, req)
    }

    /// Prints `v` as JSON if that is the format asked for; false if the caller prints text.
    fn printed_json(&self, v: &serde_json::Value) -> Result<bool> {
        if self.format != "json" {
            return Ok(false);
        }
        println!("{}", serde_json::to_string_pretty(v)?);
        Ok(true)
    }
}

#[derive(Parser)]
#[command(
    name = "geneflowctl",
    version,
    about = "geneflow NB editor and agent inspector"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Edit or show the northbound database.
    Nb {
        /// NB URL (file:///path).
        #[arg(long, env = "GENEFLOW_NB", default_value = DEFAULT_DB)]
        db: String,
        #[command(subcommand)]
        cmd: NbCmd,
    },
    /// Interfaces the agent has attached, with their logical ports.
    Ports {
        #[command(flatten)]
        agent: Agent,
    },
    /// Megaflows in XDP: match (masked), action, hits, age.
    Flows {
        #[command(flatten)]
        agent: Agent,
    },
    /// Runs a described packet through the agent's logical pipeline and prints each stage and
    /// the final actions, without sending anything (like ovn-trace).
    Trace {
        #[command(flatten)]
        agent: Agent,
        /// Logical port name (or local interface) the packet enters on, "uplink", or a
        /// provider network (its physnet or interface).
        #[arg(long)]
        in_port: String,
        /// From a provider network: the VLAN the frame carries.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=4094))]
        vlan: Option<u16>,
        #[arg(long)]
        eth_src: String,
        #[arg(long)]
        eth_dst: String,
        #[arg(long)]
        ip_src: Option<Ipv4Addr>,
        #[arg(long)]
        ip_dst: Option<Ipv4Addr>,
        /// udp, tcp, icmp (echo request), or arp (a request from --ip-src for --ip-dst).
        #[arg(long, value_parser = ["udp", "tcp", "icmp", "arp"])]
        proto: Option<String>,
        #[arg(long)]
        sport: Option<u16>,
        #[arg(long)]
        dport: Option<u16>,
        /// IPv4 TTL (default 64).
        #[arg(long)]
        ttl: Option<u8>,
    },
    /// Conntrack entries of a running agent (zone = logical datapath), or `--flush` them (all,
    /// or one `--zone`).
    Ct {
        #[command(flatten)]
        agent: Agent,
        #[arg(long)]
        flush: bool,
        #[arg(long)]
        zone: Option<u32>,
    },
    /// Per-interface counters of a running agent.
    Stats {
        #[command(flatten)]
        agent: Agent,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("geneflowctl: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Nb { db, cmd } => nbctl::nb(&db, cmd),
        Cmd::Stats { agent } => stats(&agent),
        Cmd::Ct { agent, flush, zone } => {
            if flush {
                let arg = serde_json::json!({ "zone": zone });
                let v = agent.request(&format!("ct-flush {arg}"))?;
                println!("flushed {} entries", v["flushed"]);
                return Ok(());
            }
            let v = agent.request("ct")?;
            if agent.printed_json(&v)? {
                return Ok(());
            }
            for e in v["entries"].as_array().cloned().unwrap_or_default() {
                if zone.is_some_and(|z| e["zone"].as_u64() != Some(z as u64)) {
                    continue;
                }
                println!(
                    "zone {} proto {} {} -> {} age {:.0}s idle {:.0}s{}",
                    e["zone"],
                    e["proto"],
                    e["src"].as_str().unwrap_or(""),
                    e["dst"].as_str().unwrap_or(""),
                    e["age_s"].as_f64().unwrap_or(0.0),
                    e["idle_s"].as_f64().unwrap_or(0.0),
                    if e["closing"] == true { " closing" } else { "" }
                );
            }
            Ok(())
        }
        Cmd::Ports { agent } => {
            let v = agent.request("ports")?;
            if agent.printed_json(&v)? {
                return Ok(());
            }
            for p in v["ports"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<12} ifindex {:<4} {:<6} {}",
                    p["iface"].as_str().unwrap_or("?"),
                    p["ifindex"],
                    p["kind"].as_str().unwrap_or("?"),
                    match p["logical_port"].as_str() {
                        Some(lp) => format!(
                            "port {lp} key {} mac {} on switch {} (tunnel key {})",
                            p["port_key"],
                            p["mac"].as_str().unwrap_or("?"),
                            p["switch"].as_str().unwrap_or("?"),
                            p["tunnel_key"]
                        ),
                        None => String::new(),
                    }
                );
            }
            Ok(())
        }
        Cmd::Flows { agent } => {
            let v = agent.request("flows")?;
            if agent.printed_json(&v)? {
                return Ok(());
            }
            if let Some(m) = v["masks"].as_u64() {
                println!("{m} masks");
            }
            for f in v["megaflows"].as_array().cloned().unwrap_or_default() {
                // The DPDK datapath's caches are per poll thread, and keep no age.
                let thread = f["thread"]
                    .as_u64()
                    .map(|t| format!("thread {t} "))
                    .unwrap_or_default();
                let age = f["age_s"]
                    .as_f64()
                    .map(|a| format!(" age:{a:.1}s"))
                    .unwrap_or_default();
                println!(
                    "{thread}mask {} {} actions:{} hits:{}{age}{}",
                    f["mask_id"],
                    f["match"].as_str().unwrap_or(""),
                    f["action"].as_str().unwrap_or(""),
                    f["hits"],
                    if f["stale"].as_bool().unwrap_or(false) {
                        " (stale)"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
        Cmd::Trace {
            agent,
            in_port,
            vlan,
            eth_src,
            eth_dst,
            ip_src,
            ip_dst,
            proto,
            sport,
            dport,
            ttl,
        } => {
            let req = serde_json::json!({
                "in_port": in_port, "vlan": vlan, "eth_src": eth_src, "eth_dst": eth_dst,
                "ip_src": ip_src.map(|i| i.to_string()), "ip_dst": ip_dst.map(|i| i.to_string()),
                "proto": proto, "sport": sport, "dport": dport, "ttl": ttl,
            });
            let v = agent.request(&format!("trace {req}"))?;
            if agent.printed_json(&v)? {
                return Ok(());
            }
            for (i, st) in v["stages"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                println!("{}. {}", i + 1, st.as_str().unwrap_or(""));
            }
            println!("verdict: {}", v["verdict"].as_str().unwrap_or("?"));
            Ok(())
        }
    }
}

/// Sends one request line to the agent and returns its one-line JSON answer.
pub fn ctl_request(socket: &str, req: &str) -> Result<serde_json::Value> {
    let mut s =
        UnixStream::connect(socket).with_context(|| format!("cannot reach agent at {socket}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let v: serde_json::Value =
        serde_json::from_str(&line).context("agent sent a malformed answer")?;
    if let Some(e) = v.get("error") {
        bail!("agent: {e}");
    }
    Ok(v)
}

fn stats(agent: &Agent) -> Result<()> {
    let v = agent.request("stats")?;
    if agent.printed_json(&v)? {
        return Ok(());
    }
    println!(
        "chassis {}  megaflows {}  masks {}",
        v["chassis"].as_str().unwrap_or("?"),
        v["megaflows"],
        v["masks"]
    );
    if let Some(ports) = v["ports"].as_array() {
        for p in ports {
            println!(
                "{} ({})",
                p["iface"].as_str().unwrap_or("?"),
                p["kind"].as_str().unwrap_or("?")
            );
            if let Some(c) = p["counters"].as_object() {
                for (k, val) in c {
                    if val.as_u64().unwrap_or(0) != 0 {
                        println!("    {k:<40} {val}");
                    }
                }
            }
        }
    }
    Ok(())
}
