//! The EAL: initialised once per process with the arguments given (DPDK's own syntax, passed
//! through), cleaned up on drop.

use super::{errno, strerror, DpdkError};
use std::ffi::CString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

static RUNNING: AtomicBool = AtomicBool::new(false);

/// The running EAL. One per process, once (DPDK cannot start twice); dropping it releases
/// DPDK's memory and files.
pub struct Eal {
    // The argument strings: DPDK may keep pointers into argv.
    _argv: Vec<CString>,
    // The runtime directory the EAL made (/var/run/dpdk/<prefix> for root), when it runs
    // without shared files (`--no-shconf` or `--in-memory`): nothing of another process
    // can be in it, and dropping the EAL removes it if empty (`rte_eal_cleanup` leaves the
    // directory). With shared files, DPDK's files stay, as DPDK leaves them.
    runtime_dir: Option<PathBuf>,
}

impl Eal {
    /// `args` are the EAL's own (`-l 0`, `--no-huge`, `--vdev net_af_packet0,iface=eth1`,
    /// ...), without a program name.
    pub fn init(args: &[String]) -> Result<Eal, DpdkError> {
        if RUNNING.swap(true, Ordering::SeqCst) {
            return Err(DpdkError::EalTwice);
        }
        let r = Self::start(args);
        if r.is_err() {
            RUNNING.store(false, Ordering::SeqCst);
        }
        r
    }

    fn start(args: &[String]) -> Result<Eal, DpdkError> {
        let mut argv: Vec<CString> = Vec::with_capacity(args.len() + 3);
        argv.push(CString::new("geneflowd").expect("no NUL"));
        for a in args {
            argv.push(CString::new(a.as_str()).map_err(|_| DpdkError::Nul(a.clone()))?);
        }
        // DPDK's notices are for whoever asks (`--log-level`); its errors still show.
        if !args.iter().any(|a| a.starts_with("--log-level")) {
            argv.push(CString::new("--log-level=error").expect("no NUL"));
        }
        // DPDK's telemetry socket (/var/run/dpdk/<prefix>/dpdk_telemetry.v2) is removed only
        // at process exit, after the EAL's cleanup, so the runtime directory would stay; its
        // figures are in geneflow's own metrics. `--telemetry` keeps it.
        if !args
            .iter()
            .any(|a| a == "--telemetry" || a == "--no-telemetry")
        {
            argv.push(CString::new("--no-telemetry").expect("no NUL"));
        }
        let mut ptrs: Vec<*mut libc::c_char> = argv
            .iter()
            .map(|a| a.as_ptr() as *mut libc::c_char)
            .collect();
        ptrs.push(std::ptr::null_mut());
        // A refused argument makes the EAL print its whole usage (a hundred lines) on stdout:
        // the error below names the problem in one line instead.
        let quiet = Quiet::stdout();
        // SAFETY: argc/argv describe NUL-terminated strings that outlive the EAL (kept in
        // `Eal`); rte_eal_init may permute the pointer array, which is ours to lose.
        let n = unsafe { dpdk_sys::rte_eal_init(argv.len() as i32, ptrs.as_mut_ptr()) };
        drop(quiet);
        let private = args
            .iter()
            .any(|a| a == "--no-shconf" || a == "--in-memory");
        if n < 0 {
            // A start that fails late (too little memory) has made the runtime directory.
            let reason = strerror(errno());
            if let Some(dir) = runtime_dir().filter(|_| private) {
                remove_if_empty(&dir);
            }
            return Err(DpdkError::Eal {
                args: args.to_vec(),
                reason,
            });
        }
        Ok(Eal {
            _argv: argv,
            runtime_dir: runtime_dir().filter(|_| private),
        })
    }

    /// The ports the EAL found (PCI devices bound to a DPDK driver, and vdevs).
    pub fn port_count(&self) -> u16 {
        // SAFETY: a read of the EAL's device table, valid once it runs.
        unsafe { dpdk_sys::rte_eth_dev_count_avail() }
    }
}

impl Drop for Eal {
    fn drop(&mut self) {
        // SAFETY: every port and pool made with this EAL borrows it, so they are gone; no
        // other thread calls into DPDK any more. (DPDK cannot start again in this process:
        // `RUNNING` stays set.)
        unsafe {
            dpdk_sys::rte_eal_cleanup();
        }
        if let Some(dir) = &self.runtime_dir {
            remove_if_empty(dir);
        }
    }
}

/// The EAL's runtime directory, once it has made it (empty before).
fn runtime_dir() -> Option<PathBuf> {
    // SAFETY: reads a static buffer of DPDK's, written by rte_eal_init (NUL-terminated,
    // formatted with snprintf); copied out at once.
    let c = unsafe {
        let p = dpdk_sys::rte_eal_get_runtime_dir();
        if p.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr(p)
    };
    let dir = c.to_string_lossy().into_owned();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// Removes the runtime directory if it is empty (remove_dir refuses others). Its parent
/// (/var/run/dpdk) stays: another DPDK process may be making its own directory in it.
fn remove_if_empty(dir: &std::path::Path) {
    let _ = std::fs::remove_dir(dir);
}

/// Standard output sent to /dev/null until dropped.
struct Quiet {
    saved: i32,
}

impl Quiet {
    fn stdout() -> Option<Quiet> {
        // SAFETY: plain descriptor calls on descriptors we own or on 1; on any failure the
        // original stdout stays in place.
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if null < 0 {
                return None;
            }
            let saved = libc::dup(1);
            if saved < 0 || libc::dup2(null, 1) < 0 {
                libc::close(null);
                if saved >= 0 {
                    libc::close(saved);
                }
                return None;
            }
            libc::close(null);
            Some(Quiet { saved })
        }
    }
}

impl Drop for Quiet {
    fn drop(&mut self) {
        // SAFETY: flushes C's buffered stdout into /dev/null, then puts the saved descriptor
        // back on 1 and closes the copy.
        unsafe {
            libc::fflush(std::ptr::null_mut());
            libc::dup2(self.saved, 1);
            libc::close(self.saved);
        }
    }
}
