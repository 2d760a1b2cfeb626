//! The agent's local control socket: one request line in, one JSON line out. Root-only
//! (mode 0600). Runs on its own thread; questions about forwarder state (ports, megaflows,
//! traces) are passed to the forwarder over a channel and answered between its batches.

use crate::metrics::Shared;
use aya::maps::{MapData, PerCpuArray};
use crossbeam_channel::{bounded, Sender};
use geneflow_abi::{CtEntry, CtKey, PortCounters};
use geneflow_control::compiler::Pipeline;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::warn;

/// One port as `geneflowctl ports` shows it: the interface, and what is bound to it.
pub fn port_json(
    pipeline: &Pipeline,
    iface: &str,
    (ifindex, slot): (u32, u32),
    kind: &str,
) -> Value {
    let b = pipeline.bindings.get(iface);
    let sw = b.and_then(|b| pipeline.datapaths.get(&b.tunnel_key));
    json!({
        "iface": iface, "ifindex": ifindex, "slot": slot, "kind": kind,
        "logical_port": b.map(|b| b.port.clone()),
        "port_key": b.map(|b| b.key),
        "mac": b.map(|b| b.mac.to_string()),
        "switch": sw.map(|d| d.name.clone()),
        "tunnel_key": b.map(|b| b.tunnel_key),
    })
}

/// The conntrack entries as `geneflowctl ct` shows them; `now_ns` on the entries' clock.
pub fn ct_json(entries: Vec<(CtKey, CtEntry)>, now_ns: u64) -> Value {
    let ip = |v: u32| std::net::Ipv4Addr::from(v.to_ne_bytes()).to_string();
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|(k, e)| {
            json!({
                "zone": k.zone,
                "proto": k.proto,
                "src": format!("{}:{}", ip(k.src), u16::from_be(k.sport)),
                "dst": format!("{}:{}", ip(k.dst), u16::from_be(k.dport)),
                "age_s": now_ns.saturating_sub(e.created_ns) as f64 / 1e9,
                "idle_s": now_ns.saturating_sub(e.last_seen_ns) as f64 / 1e9,
                "closing": e.flags & geneflow_abi::ct::CLOSING != 0,
            })
        })
        .collect();
    json!({ "entries": entries })
}

/// A question for the forwarder.
pub struct CtlRequest {
    pub cmd: String,
    pub arg: Value,
    pub reply: Sender<Value>,
}

pub type Counters = Arc<Mutex<Option<PerCpuArray<MapData, PortCounters>>>>;

pub struct CtlServer {
    path: PathBuf,
}

impl CtlServer {
    pub fn start(
        path: &Path,
        shared: Arc<Shared>,
        counters: Counters,
        forwarder: Sender<CtlRequest>,
    ) -> std::io::Result<CtlServer> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        std::thread::Builder::new()
            .name("gf-ctl".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut s) = conn else { continue };
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut line = String::new();
                    if BufReader::new(&s).read_line(&mut line).is_err() {
                        continue;
                    }
                    let line = line.trim();
                    let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
                    let answer = match cmd {
                        "stats" => {
                            let c = counters.lock().ok();
                            shared.snapshot(c.as_ref().and_then(|c| c.as_ref()))
                        }
                        "ports" | "flows" | "trace" | "ct" | "ct-flush" => {
                            let arg = if rest.is_empty() {
                                Value::Null
                            } else {
                                serde_json::from_str(rest).unwrap_or(Value::Null)
                            };
                            let (tx, rx) = bounded(1);
                            let req = CtlRequest {
                                cmd: cmd.to_string(),
                                arg,
                                reply: tx,
                            };
                            if forwarder.send(req).is_err() {
                                json!({"error": "forwarder is gone"})
                            } else {
                                rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(
                                    |_| json!({"error": "forwarder did not answer"}),
                                )
                            }
                        }
                        other => json!({ "error": format!("unknown request {other:?}") }),
                    };
                    if let Err(e) = writeln!(s, "{answer}") {
                        warn!("control socket write: {e}");
                    }
                }
            })?;
        Ok(CtlServer {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for CtlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
