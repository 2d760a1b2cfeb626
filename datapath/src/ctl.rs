//! The agent's local control socket: one request line in, one JSON line out. Root-only
//! (mode 0600). Runs on its own thread, never touching the forwarder's state except through
//! `Shared`.

use crate::metrics::Shared;
use aya::maps::{MapData, PerCpuArray};
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::warn;

pub struct CtlServer {
    path: PathBuf,
}

impl CtlServer {
    pub fn start(
        path: &Path,
        shared: Arc<Shared>,
        counters: Option<PerCpuArray<MapData, geneflow_abi::PortCounters>>,
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
                    let mut line = String::new();
                    if BufReader::new(&s).read_line(&mut line).is_err() {
                        continue;
                    }
                    let answer = match line.trim() {
                        "stats" => shared.snapshot(counters.as_ref()),
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
