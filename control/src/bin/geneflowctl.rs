//! geneflowctl: edits the NB DB in the style of ovn-nbctl and inspects a running agent over
//! its local control socket.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use geneflow_control::model::{Chassis, LogicalPort, LogicalSwitch, Mac, ModelError};
use geneflow_control::nb::FileStore;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::time::Duration;

const DEFAULT_DB: &str = "file:///var/lib/geneflow/nb.json";

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
    /// Per-interface counters of a running agent.
    Stats {
        /// Agent control socket.
        #[arg(
            long,
            env = "GENEFLOW_CTL",
            default_value = "/run/geneflow/geneflowd.sock"
        )]
        socket: String,
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
}

#[derive(Subcommand)]
enum NbCmd {
    /// Add a chassis and its Geneve encap IPv4 address.
    ChassisAdd { name: String, encap_ip: Ipv4Addr },
    /// Remove a chassis (it must host no port).
    ChassisDel { name: String },
    /// Add a logical switch with its 24-bit tunnel key (the VNI).
    LsAdd {
        name: String,
        #[arg(long)]
        key: u32,
    },
    /// Remove a logical switch (it must have no port).
    LsDel { name: String },
    /// Add a logical port to a switch.
    LspAdd {
        switch: String,
        name: String,
        mac: String,
        ips: Vec<Ipv4Addr>,
        /// 15-bit port key, unique within the switch.
        #[arg(long)]
        key: u32,
    },
    /// Bind a port to a chassis and a local interface there.
    LspBind {
        name: String,
        chassis: String,
        iface: String,
    },
    /// Remove a logical port.
    LspDel { name: String },
    /// Print the NB contents.
    Show {
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
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
        Cmd::Nb { db, cmd } => nb(&db, cmd),
        Cmd::Stats { socket, format } => stats(&socket, &format),
    }
}

fn dup(kind: &'static str, name: &str) -> String {
    ModelError::Duplicate {
        kind,
        name: name.to_string(),
    }
    .to_string()
}

fn unknown(kind: &'static str, name: &str) -> String {
    ModelError::Unknown {
        kind,
        name: name.to_string(),
    }
    .to_string()
}

fn nb(db: &str, cmd: NbCmd) -> Result<()> {
    let store = FileStore::open(db)?;
    match cmd {
        NbCmd::ChassisAdd { name, encap_ip } => {
            store.update(|d| {
                if d.chassis.contains_key(&name) {
                    return Err(dup("chassis", &name));
                }
                let c = Chassis {
                    name: name.clone(),
                    encap_ip,
                };
                c.validate().map_err(|e| e.to_string())?;
                d.chassis.insert(name.clone(), c);
                Ok(())
            })?;
        }
        NbCmd::ChassisDel { name } => {
            store.update(|d| {
                if d.chassis.remove(&name).is_none() {
                    return Err(unknown("chassis", &name));
                }
                if let Some(p) = d
                    .ports
                    .values()
                    .find(|p| p.chassis.as_deref() == Some(&name))
                {
                    return Err(format!("chassis {name:?} still hosts port {:?}", p.name));
                }
                Ok(())
            })?;
        }
        NbCmd::LsAdd { name, key } => {
            store.update(|d| {
                if d.switches.contains_key(&name) {
                    return Err(dup("switch", &name));
                }
                let s = LogicalSwitch {
                    name: name.clone(),
                    tunnel_key: key,
                };
                s.validate().map_err(|e| e.to_string())?;
                d.switches.insert(name.clone(), s);
                Ok(())
            })?;
        }
        NbCmd::LsDel { name } => {
            store.update(|d| {
                if d.switches.remove(&name).is_none() {
                    return Err(unknown("switch", &name));
                }
                if let Some(p) = d.ports.values().find(|p| p.switch == name) {
                    return Err(format!("switch {name:?} still has port {:?}", p.name));
                }
                Ok(())
            })?;
        }
        NbCmd::LspAdd {
            switch,
            name,
            mac,
            ips,
            key,
        } => {
            let mac: Mac = mac.parse()?;
            let port_key = u16::try_from(key)
                .ok()
                .filter(|k| *k >= 1 && *k <= geneflow_control::model::MAX_PORT_KEY)
                .ok_or(ModelError::PortKeyRange(key))?;
            store.update(|d| {
                if d.ports.contains_key(&name) {
                    return Err(dup("port", &name));
                }
                if !d.switches.contains_key(&switch) {
                    return Err(unknown("switch", &switch));
                }
                let p = LogicalPort {
                    name: name.clone(),
                    switch: switch.clone(),
                    mac,
                    ips: ips.clone(),
                    port_key,
                    chassis: None,
                    iface: None,
                };
                p.validate().map_err(|e| e.to_string())?;
                d.ports.insert(name.clone(), p);
                Ok(())
            })?;
        }
        NbCmd::LspBind {
            name,
            chassis,
            iface,
        } => {
            store.update(|d| {
                if !d.chassis.contains_key(&chassis) {
                    return Err(unknown("chassis", &chassis));
                }
                let p = d
                    .ports
                    .get_mut(&name)
                    .ok_or_else(|| unknown("port", &name))?;
                geneflow_control::model::check_ifname(&iface).map_err(|e| e.to_string())?;
                p.chassis = Some(chassis.clone());
                p.iface = Some(iface.clone());
                Ok(())
            })?;
        }
        NbCmd::LspDel { name } => {
            store.update(|d| {
                d.ports
                    .remove(&name)
                    .map(|_| ())
                    .ok_or_else(|| unknown("port", &name))
            })?;
        }
        NbCmd::Show { format } => {
            let d = store.load()?;
            if format == "json" {
                println!("{}", serde_json::to_string_pretty(&d)?);
                return Ok(());
            }
            println!("NB version {}", d.version);
            for c in d.chassis.values() {
                println!("chassis {} encap geneve {}", c.name, c.encap_ip);
            }
            for s in d.switches.values() {
                println!("switch {} (tunnel key {})", s.name, s.tunnel_key);
                for p in d.ports.values().filter(|p| p.switch == s.name) {
                    let ips: Vec<String> = p.ips.iter().map(|i| i.to_string()).collect();
                    let bind = match (&p.chassis, &p.iface) {
                        (Some(c), Some(i)) => format!("on {c} iface {i}"),
                        (Some(c), None) => format!("on {c}"),
                        _ => "unbound".to_string(),
                    };
                    println!(
                        "    port {} key {} addresses [\"{} {}\"] {}",
                        p.name,
                        p.port_key,
                        p.mac,
                        ips.join(" "),
                        bind
                    );
                }
            }
        }
    }
    Ok(())
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

fn stats(socket: &str, format: &str) -> Result<()> {
    let v = ctl_request(socket, "stats")?;
    if format == "json" {
        println!("{}", serde_json::to_string_pretty(&v)?);
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
