//! The agent's local control socket: one request line in, one JSON line out. Root-only
//! (mode 0600). Runs on its own thread; questions about forwarder state (ports, megaflows,
//! traces) are passed to the forwarder over a channel and answered between its batches.

use crate::metrics::Shared;
use aya::maps::{MapData, PerCpuArray};
use crossbeam_channel::{bounded, Sender};
use geneflow_abi::PortCounters;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::warn;

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
