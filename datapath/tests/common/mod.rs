//! What the DPDK integration tests share: running one of their own ignored tests as a child
//! process inside a network namespace (the EAL starts once per process, and the child's
//! `/sys` and interfaces are the namespace's).

use std::ffi::OsStr;
use std::process::Command;

/// Runs the ignored test `child` of this test binary inside namespace `ns` with `env` set;
/// returns whether it passed and its output.
pub fn run_child(ns: &str, child: &str, env: (&str, &OsStr)) -> (bool, String) {
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args([
            "--ignored",
            "--exact",
            child,
            "--nocapture",
            "--test-threads=1",
        ])
        .env(env.0, env.1)
        .output()
        .expect("child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.contains("1 passed"), text)
}
