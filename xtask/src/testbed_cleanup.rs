//! Cleaning up after testbeds on every exit path: what every live testbed of this process
//! made (for the Ctrl-C handler), and what runs that were killed left behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Namespaces, agent pids and bpffs mounts of every live testbed of this process, for the
/// Ctrl-C handler.
pub(crate) static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

#[derive(Default)]
pub(crate) struct Live {
    pub(crate) namespaces: Vec<String>,
    pub(crate) pids: Vec<u32>,
    pub(crate) mounts: Vec<PathBuf>,
}

/// Removes everything every live testbed made. Safe to call from a signal handler thread.
pub fn cleanup_all() {
    let live = match LIVE.lock() {
        Ok(mut l) => std::mem::take(&mut *l),
        Err(_) => return,
    };
    for Live {
        namespaces: ns,
        pids,
        mounts,
    } in live
    {
        for p in pids {
            // SAFETY: plain kill(2) on a pid we spawned.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
        for n in ns {
            let _ = Command::new("ip").args(["netns", "del", &n]).status();
        }
        for m in mounts {
            unmount_bpffs(&m);
        }
    }
}

/// Removes the pins of a testbed's bpffs and unmounts it (the pinned maps and links die with
/// the last reference).
pub(crate) fn unmount_bpffs(m: &Path) {
    if let Ok(rd) = std::fs::read_dir(m) {
        for e in rd.flatten() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let _ = Command::new("umount").arg("-l").arg(m).status();
}

/// Installs a Ctrl-C/SIGTERM handler that cleans up and exits (once per process).
pub fn install_signal_cleanup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            eprintln!("interrupted: removing testbed namespaces");
            cleanup_all();
            std::process::exit(130);
        });
    });
}

/// Removes namespaces left by earlier runs whose process is gone (a run killed with SIGKILL
/// cannot clean up after itself). Only touches names of the form `gf<pid>x...`.
pub fn sweep_stale() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if of_dead_run(name) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    // bpffs mounts of dead runs: /tmp/gf<pid>x<tag>/bpffs.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(_), Some(at), Some("bpf")) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let run = at
            .strip_suffix("/bpffs")
            .and_then(|dir| Path::new(dir).file_name())
            .and_then(|n| n.to_str());
        if run.is_some_and(of_dead_run) {
            unmount_bpffs(Path::new(at));
        }
    }
}

/// Whether `name` is of the form `gf<pid>x...` for a process that no longer exists.
fn of_dead_run(name: &str) -> bool {
    name.strip_prefix("gf")
        .and_then(|r| r.split_once('x'))
        .and_then(|(pid, _)| pid.parse::<i32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}
